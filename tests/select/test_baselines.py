"""jaxgrad.select.baselines: the all-sources and random baselines (the random one also matched to
the selection's size in samples, for units of unequal size), and gradient similarity against a
hand-computed cosine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxgrad import select as sel
from jaxgrad.select.baselines import baseline_random_total


def test_random_baseline_matches_the_selections_size():
    # One large cluster and small ones, as average linkage makes them: the size of the
    # selection is hit whenever a random order reaches it.
    sizes = [60, 1, 2, 4, 3, 4, 2, 1, 3, 5, 2, 4, 1]
    for total in (64, 60, 20, 13, 1):
        picks = {tuple(baseline_random_total(sizes, total, seed=s)) for s in range(10)}
        for p in picks:
            assert sum(sizes[i] for i in p) == total, (total, p)
            assert list(p) == sorted(p)
        if total == 20:
            assert len(picks) > 1, "the same units every seed: not random"
    assert baseline_random_total(sizes, 64, seed=3).tolist() == \
        baseline_random_total(sizes, 64, seed=3).tolist()
    for seed in range(8):  # a huge unit is not kept when small ones reach the total
        assert baseline_random_total([5, 5, 5, 1000], 10, seed=seed).tolist() in (
            [0, 1], [0, 2], [1, 2]), seed
    assert baseline_random_total([300, 500], 10).tolist() == [0]  # none fits: the closest
    with pytest.raises(ValueError, match="sizes must be"):
        baseline_random_total([], 3)


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
