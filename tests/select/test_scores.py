"""Tests for jaxgrad.select (random ensembles, stepwise selection, baselines) and the subsets
of jaxgrad.estimate.

Planted structure throughout: a score function whose best subset is known by brute force,
synthetic projected gradients with one source aligned with the target and two opposed to it,
clusters of directions with scattered norms. References are hand loops in NumPy.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from jaxgrad import select as sel
from jaxgrad.estimate import subsets as subsets_lib
from jaxgrad.estimate.lift import estimate_subsets
from jaxgrad.estimate.surrogate import fit_subsets


def test_sample_subsets_sizes_distinct_and_seeded():
    subsets = subsets_lib.sample_subsets(20, 300, 0.5, seed=3)
    assert subsets.shape == (300, 20) and subsets.dtype == bool
    assert np.all(subsets.sum(axis=1) == 10), "every subset must hold half of the 20 sources"
    assert len({row.tobytes() for row in subsets}) == 300, "subsets must be distinct"
    np.testing.assert_array_equal(subsets, subsets_lib.sample_subsets(20, 300, 0.5, seed=3))
    assert not np.array_equal(subsets, subsets_lib.sample_subsets(20, 300, 0.5, seed=4))
    assert np.all(subsets_lib.sample_subsets(7, 5, 3).sum(axis=1) == 3), "a count is a count"
    # 6 distinct subsets of 2 of 4 sources: asking for 5 draws 5 distinct ones, 9 repeats some.
    assert len({r.tobytes() for r in subsets_lib.sample_subsets(4, 5, 2)}) == 5
    with pytest.warns(UserWarning, match="only 6 distinct subsets"):
        many = subsets_lib.sample_subsets(4, 9, 2, seed=1)
    assert len({r.tobytes() for r in many}) == 6, "every distinct subset must appear"
    for bad in (0.0, 1.5, 0, 21):
        with pytest.raises(ValueError, match="size must be a fraction in \\[0, 1\\) or a whole|of only 20"):
            subsets_lib.sample_subsets(20, 3, bad)
    assert np.all(subsets_lib.sample_subsets(7, 5, 3.0).sum(axis=1) == 3), "3.0 is the count 3"
    with pytest.raises(TypeError, match="size must be"):
        subsets_lib.sample_subsets(20, 3, True)


def test_masks_from_sources():
    ids = np.array([2, 0, 1, 2, 3, 0])
    subsets = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    masks = subsets_lib.masks_from_sources(ids, subsets)
    want = np.array([[subsets[s, i] for i in ids] for s in range(3)])
    np.testing.assert_array_equal(masks, want)
    np.testing.assert_array_equal(subsets_lib.masks_from_sources(ids, [[0, 2], [3], []]), want)
    with pytest.raises(ValueError, match=r"subset 1 names unknown source\(s\) \[4\]"):
        subsets_lib.masks_from_sources(ids, [[0], [4]])
    with pytest.raises(ValueError, match="names source 3 but the subsets cover only 3 sources"):
        subsets_lib.masks_from_sources(ids, subsets[:, :3])
    with pytest.raises(ValueError, match="1-D array of ints"):
        subsets_lib.masks_from_sources(ids.astype(float), subsets)


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


# Planted score: additive values with one redundant pair (2 and 4 overlap).
_VALUES = np.array([3.0, -1.0, 2.0, -2.0, 1.5, -0.5, 0.7, -3.0])


def _planted_score(masks):
    masks = np.asarray(masks, bool)
    return masks @ _VALUES - 1.8 * (masks[:, 2] & masks[:, 4])


def test_forward_selection_recovers_planted_best_subset_one_call_per_round():
    m = len(_VALUES)
    every = np.array(list(itertools.product([False, True], repeat=m)))
    best = set(np.flatnonzero(every[np.argmax(_planted_score(every))]))
    calls = []

    def score_fn(masks):
        calls.append(masks.shape[0])
        return _planted_score(masks)

    res = sel.forward_selection(score_fn, m)
    assert set(res.selected) == best == {0, 2, 6}, f"selected {res.selected}, best {best}"
    assert res.selected == [0, 2, 6], "greedy order follows the gains"
    np.testing.assert_allclose(res.path_scores, [3.0, 5.0, 5.7])
    assert res.initial_score == 0.0
    # One batched call per round: all candidates (plus the empty set in round one).
    assert calls == [m + 1, m - 1, m - 2, m - 3] and res.n_calls == 4
    capped = sel.forward_selection(_planted_score, m, max_size=2)
    assert capped.selected == [0, 2]
    assert sel.forward_selection(_planted_score, m, min_gain=1.0).selected == [0, 2]
    with pytest.raises(ValueError, match="one score per row"):
        sel.forward_selection(lambda masks: np.zeros(2), m)


def test_ordered_selection_keeps_improving_sources():
    res = sel.ordered_selection(_VALUES, _planted_score)
    # Visits 0, 2, 4, 6, ...: 4 is redundant with 2 (+1.5 - 1.8), the negatives never help.
    assert res.selected == [0, 2, 6]
    np.testing.assert_allclose(res.path_scores, [3.0, 5.0, 5.7])
    assert res.n_calls == len(_VALUES) and res.n_evaluated == len(_VALUES) + 1


def test_baselines_and_gradient_similarity():
    np.testing.assert_array_equal(sel.baseline_all(4), [0, 1, 2, 3])
    pick = sel.baseline_random(10, 0.3, seed=2)
    assert pick.size == 3 and np.all(np.diff(pick) > 0) and pick.max() < 10
    np.testing.assert_array_equal(pick, sel.baseline_random(10, 0.3, seed=2))
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 5)).astype(np.float32)
    ids = rng.integers(0, 3, size=30)
    target = rng.normal(size=(7, 5)).astype(np.float32)
    got = np.asarray(sel.gradient_similarity_scores(feats, ids, target, n_sources=4))
    t = target.mean(0)
    for source in range(3):
        mean = feats[ids == source].mean(0)
        want = mean @ t / (np.linalg.norm(mean) * np.linalg.norm(t))
        assert math.isclose(got[source], want, rel_tol=1e-5, abs_tol=1e-6)
    assert np.isnan(got[3]), "a source without samples has no score"
    with pytest.raises(ValueError, match="k = 4 columns but feats_NxK has k = 5"):
        sel.gradient_similarity_scores(feats, ids, target[:, :4])
    with pytest.raises(ValueError, match="30 ints"):
        sel.gradient_similarity_scores(feats, ids[:5], target)
    bad = feats.copy()
    bad[2, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        sel.gradient_similarity_scores(bad, ids, target)


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
