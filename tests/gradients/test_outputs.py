"""Output functions against a direct numpy computation."""

import numpy as np
import pytest

from jaxgrad.gradients.outputs import get_output_fn, logit_odds, token_ce


def _reference(logits, targets, mask, eps):
    z = logits - logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    p = np.take_along_axis(prob, targets[..., None], -1)[..., 0]
    pc = np.clip(p, eps, 1 - eps)
    odds = np.log(pc / (1 - pc))
    ce = -np.log(p)
    n = mask.sum(-1)
    return (odds * mask).sum(-1) / n, (ce * mask).sum(-1) / n


def test_logit_odds_and_token_ce_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float64) * 3
    logits[0, 1, 4] = 40.0  # a near-certain gold token: p is clipped at 1 - eps
    targets = rng.integers(0, 11, (3, 5))
    targets[0, 1] = 4
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float64)
    odds_ref, ce_ref = _reference(logits, targets, mask, 1e-4)
    np.testing.assert_allclose(np.asarray(logit_odds(logits, targets, mask, 1e-4)), odds_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(token_ce(logits, targets, mask)), ce_ref, rtol=1e-5)


def test_empty_mask_gives_zero_not_nan():
    out = logit_odds(np.zeros((1, 3, 4)), np.zeros((1, 3), int), np.zeros((1, 3)))
    assert np.asarray(out).tolist() == [0.0]


def test_unknown_output_fn():
    with pytest.raises(ValueError, match="unknown output function 'acc'"):
        get_output_fn("acc")


def test_outputs_loss_is_the_estimated_metric():
    """outputs_loss: logistic loss of logit-odds, mean CE for token_ce; bad names are refused."""
    from jaxgrad.gradients.outputs import outputs_loss

    f = np.array([[-2.0, 0.0, 3.0], [1.0, 1.0, 1.0]], np.float32)
    np.testing.assert_allclose(outputs_loss(f, "logit_odds"), np.log1p(np.exp(-f)).mean(axis=1),
                               rtol=1e-6)
    np.testing.assert_allclose(outputs_loss(f, "token_ce"), f.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(outputs_loss(f, "token_ce", axis=0), f.mean(axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown output function 'ce'"):
        outputs_loss(f, "ce")
