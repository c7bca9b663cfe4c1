"""jaxgrad.select.stepwise: forward and ordered selection on a planted score whose best subset is
known by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxgrad import select as sel


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
