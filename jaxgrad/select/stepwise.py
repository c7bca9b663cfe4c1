"""Stepwise selection on a surrogate: a score function called on batches of candidate subsets.

:func:`forward_selection` is true forward stepwise selection: each round scores every remaining
candidate added to the current set in one batched call of ``score_fn``.
:func:`ordered_selection` is the paper's single pass: it adds sources in the order of their
scores and keeps each one that improves the estimate by more than ``min_gain``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from jaxgrad.common.checks import nonnegative_float, positive_int
from jaxgrad.select.scores import check_scores


class StepwiseResult(NamedTuple):
    """Outcome of ``forward_selection`` / ``ordered_selection``.

    Attributes:
      selected: the chosen sources, in the order they were added.
      path_scores: the score of the selected set after each addition (``initial_score`` first).
      initial_score: the score of the empty set.
      n_calls: calls of ``score_fn``.
      n_evaluated: subsets scored in all.
    """

    selected: list[int]
    path_scores: list[float]
    initial_score: float
    n_calls: int
    n_evaluated: int


ScoreFn = Callable[[np.ndarray], jax.typing.ArrayLike]


def forward_selection(score_fn: ScoreFn, n_sources: int, max_size: int | None = None, *,
                      min_gain: float = 0.0) -> StepwiseResult:
    """Forward stepwise selection: repeatedly add the source that raises the score most.

    Each round calls ``score_fn`` once on a C×M boolean array: every remaining candidate added
    to the current set (in the first round also the empty set, as the baseline). The search
    stops when no candidate improves the current score by more than ``min_gain``, or at
    ``max_size`` sources.

    Args:
      score_fn: maps C×M subset masks to C finite scores, higher is better (e.g. fit the
        surrogate on ``masks_from_sources(ids, masks)`` and return ``-estimate["loss"]``).
      n_sources: M.
      max_size: largest selection (default M).
      min_gain: the smallest improvement that counts, >= 0.

    Returns:
      ``StepwiseResult``.

    Raises:
      TypeError / ValueError: ``n_sources`` / ``max_size`` not positive ints, ``max_size`` > M,
        ``min_gain`` < 0, or ``score_fn`` returning the wrong shape or non-finite scores.
    """
    n_sources = positive_int("n_sources", n_sources)
    max_size = n_sources if max_size is None else positive_int("max_size", max_size)
    if max_size > n_sources:
        raise ValueError(f"max_size must be <= n_sources = {n_sources}, got {max_size}")
    min_gain = nonnegative_float("min_gain", min_gain)
    search = _Search(score_fn, n_sources)
    while len(search.selected) < max_size:
        candidates = np.flatnonzero(~search.current)
        rows = np.repeat(search.current[None, :], len(candidates), axis=0)
        rows[np.arange(len(candidates)), candidates] = True
        scores = search.score(rows)
        j = int(np.argmax(scores))
        if not scores[j] > search.best + min_gain:
            break
        search.add(candidates[j], scores[j])
    return search.result()


def ordered_selection(scores_M: jax.typing.ArrayLike, score_fn: ScoreFn, *,
                      min_gain: float = 0.0) -> StepwiseResult:
    """The paper's single ordered pass: visit sources by decreasing score (NaN scores skipped),
    add each to the current set and keep it if ``score_fn`` improves by more than ``min_gain``.

    One ``score_fn`` call per visited source (the first call also scores the empty set).

    Args:
      scores_M: [M] per-source scores giving the order, higher first (e.g.
        ``EnsembleScores.scores``); NaN sources are never visited.
      score_fn: maps C×M boolean subset masks to C finite scores, higher is better.
      min_gain: the smallest improvement that counts, >= 0.

    Returns:
      ``StepwiseResult``: the kept sources in visiting order, the score after each addition.

    Raises:
      ValueError: ``scores_M`` not 1-D or with an inf; ``min_gain`` negative or not finite;
        ``score_fn`` returning the wrong shape or non-finite scores.
    """
    scores = check_scores(scores_M)
    min_gain = nonnegative_float("min_gain", min_gain)
    n_sources = scores.shape[0]
    valid = np.flatnonzero(~np.isnan(scores))
    order = valid[np.argsort(-scores[valid], kind="stable")]
    search = _Search(score_fn, n_sources)
    for source in order:
        trial = search.current.copy()
        trial[source] = True
        score = search.score(trial[None, :])[0]
        if score > search.best + min_gain:
            search.add(source, score)
    return search.result()


class _Search:
    """What both stepwise searches keep: the current set, the path and the call counts.

    The first :meth:`score` call also scores the empty set (one call): its score is the
    starting ``best`` and the result's ``initial_score``.
    """

    def __init__(self, score_fn: ScoreFn, n_sources: int):
        self.score_fn = score_fn
        self.current = np.zeros(n_sources, bool)
        self.selected: list[int] = []
        self.path: list[float] = []
        self.best = self.initial = float("nan")
        self.n_calls = self.n_evaluated = 0

    def score(self, rows: np.ndarray) -> np.ndarray:
        """``score_fn`` of the subsets ``rows`` (C×M), after the empty set on the first call."""
        first = self.n_calls == 0
        if first:
            rows = np.concatenate([self.current[None, :], rows])
        scores = _call_score_fn(self.score_fn, rows)
        self.n_calls += 1
        self.n_evaluated += len(rows)
        if first:
            self.best = self.initial = float(scores[0])
            scores = scores[1:]
        return scores

    def add(self, source: int, score: float) -> None:
        self.current[source] = True
        self.selected.append(int(source))
        self.best = float(score)
        self.path.append(self.best)

    def result(self) -> StepwiseResult:
        return StepwiseResult(self.selected, self.path, self.initial, self.n_calls,
                              self.n_evaluated)


def _call_score_fn(score_fn: ScoreFn, rows: np.ndarray) -> np.ndarray:
    out = np.asarray(score_fn(rows), np.float64)
    if out.shape != (rows.shape[0],):
        raise ValueError(f"score_fn must return one score per row: called with "
                         f"{rows.shape[0]} subsets, returned shape {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"score_fn returned {int(np.sum(~np.isfinite(out)))} NaN or inf "
                         "scores")
    return out
