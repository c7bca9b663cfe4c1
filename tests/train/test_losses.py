"""jaxgrad.train.losses against numpy: per-example token cross-entropy and the batch loss."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from helpers.training import tiny_model
from jaxgrad.models.forward import model_logits


def test_losses_token_weighted_and_padding_rows_excluded():
    """jaxgrad.train.losses against numpy: per-example mean CE, and the batch loss
    Σ valid·mask·CE / Σ valid·mask (a padding row with a nonzero mask must not count)."""
    from jaxgrad.train.losses import batch_loss, token_cross_entropy

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 4)).astype(np.int32)
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]], np.float32)
    valid = np.array([1, 1, 0], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    per_example = (ce * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(token_cross_entropy(logits, targets, mask), per_example, rtol=1e-6)
    batch = {"targets": targets, "target_mask": mask, "valid": valid}
    want = (ce * mask * valid[:, None]).sum() / (mask * valid[:, None]).sum()
    assert float(batch_loss(lambda b: jnp.asarray(logits), batch)) == pytest.approx(want, rel=1e-6)
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="lacks.*attention_mask"):
        model_logits(model, {"input_ids": np.zeros((1, 3), np.int32)})
