"""jaxgrad.select.scores: ensemble scores (means over the subsets holding each source, bootstrap
intervals) rank planted sources and equal hand means; top-k and threshold selection, a count
meaning a count whatever its type.

Planted structure: synthetic projected gradients with one source aligned with the target and two
opposed to it, fitted with the gradex surrogate; references are hand loops in NumPy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from jaxgrad import select as sel
from jaxgrad.estimate import subsets as subsets_lib
from jaxgrad.estimate.lift import estimate_subsets
from jaxgrad.estimate.surrogate import fit_subsets
from jaxgrad.select.scores import select_top


def _planted_surrogate_estimates(subsets, seed=0):
    """Fits the gradex surrogate on planted features and returns the linearised target logit.

    Source 0's gradients point along the target's, sources 4 and 5 against it, the rest are
    unrelated: fine-tuning on 0 should help the target most, on 4 or 5 hurt it.
    """
    rng = np.random.default_rng(seed)
    k, per_source = 8, 40
    target_dir = np.eye(k)[0]
    feats, ids = [], []
    for source in range(6):
        sign = {0: 1.0, 4: -1.0, 5: -1.0}.get(source, 0.0)
        center = sign * target_dir + (0.0 if sign else 1.0) * rng.normal(size=k) * 0.5
        center[0] = sign
        feats.append(center + 0.3 * rng.normal(size=(per_source, k)))
        ids.append(np.full(per_source, source))
    feats, ids = np.concatenate(feats).astype(np.float32), np.concatenate(ids)
    target = (target_dir + 0.3 * rng.normal(size=(20, k))).astype(np.float32)
    fits = fit_subsets(feats, subsets_lib.masks_from_sources(ids, subsets), C=1e-2, seed=seed)
    est = estimate_subsets(fits, 1.0, target, np.zeros(20, np.float32))
    return np.asarray(est["mean_output"])


def test_ensemble_scores_rank_planted_sources_and_match_hand_means():
    subsets = subsets_lib.sample_subsets(6, 20, 0.5, seed=0)
    est = _planted_surrogate_estimates(subsets)
    res = sel.ensemble_scores(subsets, est, n_boot=500, seed=1)
    scores = np.asarray(res.scores)
    hand = np.array([est[subsets[:, i]].mean() for i in range(6)])
    np.testing.assert_allclose(scores, hand, rtol=1e-5, err_msg="score != mean over subsets")
    np.testing.assert_array_equal(np.asarray(res.counts), subsets.sum(axis=0))
    order = np.argsort(-scores)
    assert order[0] == 0, f"the aligned source 0 should rank first, ranking {order}"
    assert set(order[-2:]) == {4, 5}, f"the opposed sources 4, 5 should rank last, {order}"
    low, high = np.asarray(res.ci_low), np.asarray(res.ci_high)
    assert np.all((low <= scores) & (scores <= high)), "the bootstrap CI must contain the mean"
    assert np.all(high > low), "a bootstrap over 20 varied subsets has a non-empty interval"
    again = sel.ensemble_scores(subsets, est, n_boot=500, seed=1)
    np.testing.assert_array_equal(np.asarray(again.ci_low), low)


def test_ensemble_scores_unsampled_source_and_bad_input():
    subsets = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1]], bool)
    with pytest.warns(UserWarning, match=r"sources \[1\] are in no subset"):
        res = sel.ensemble_scores(subsets, np.array([1.0, 2.0, 3.0]), n_boot=50)
    assert np.isnan(res.scores[1]) and np.isnan(res.ci_low[1]) and int(res.counts[1]) == 0
    np.testing.assert_allclose(np.asarray(res.scores)[[0, 2]], [1.5, 2.0])
    with pytest.raises(ValueError, match=r"estimates_S must have shape \(S,\) = \(3,\)"):
        sel.ensemble_scores(subsets, np.ones(4))
    with pytest.raises(ValueError, match="1 NaN or inf"):
        sel.ensemble_scores(subsets, np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="2-D boolean"):
        sel.ensemble_scores(subsets.astype(int), np.ones(3))


def test_select_top_and_threshold():
    scores = np.array([0.1, np.nan, 0.9, 0.5, 0.9, -1.0])
    np.testing.assert_array_equal(sel.select_top(scores, 2), [2, 4])
    np.testing.assert_array_equal(sel.select_top(scores, 0.6), [2, 4, 3])  # 60% of 5 scored
    np.testing.assert_array_equal(sel.select_threshold(scores, 0.1), [2, 4, 3, 0])
    assert sel.select_threshold(scores, 5.0).size == 0
    with pytest.raises(ValueError, match="every score is NaN"):
        sel.select_top(np.array([np.nan]), 1)


def test_no_warning_when_all_sources_sampled():
    """Subsets that cover every source give every source a finite score and interval, silently
    (the warning is for sources no subset contains)."""
    subsets = np.asarray(subsets_lib.sample_subsets(5, 8, 0.4, seed=0))
    assert subsets.any(axis=0).all(), "the sampled subsets must cover all 5 sources"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sel.ensemble_scores(subsets, np.arange(8.0), n_boot=10)
    assert not caught, [str(w.message) for w in caught]
    np.testing.assert_array_equal(out.counts, subsets.sum(axis=0))
    for field in (out.scores, out.ci_low, out.ci_high):
        assert np.isfinite(np.asarray(field)).all(), field
    want = [np.arange(8.0)[subsets[:, m]].mean() for m in range(5)]
    np.testing.assert_allclose(out.scores, want, rtol=1e-6)


def test_select_top_follows_the_rule():
    scores = np.array([0.1, 0.9, 0.5, np.nan, 0.7])
    np.testing.assert_array_equal(select_top(scores, 2.0), select_top(scores, 2))
    np.testing.assert_array_equal(select_top(scores, 0.5), [1, 4])  # half of the 4 scored
