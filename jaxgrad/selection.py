"""Choosing data sources from subset estimates: random ensembles, thresholds, stepwise search.

GradEx's last step turns per-subset estimates (subsets from :mod:`jaxgrad.estimate.subsets`,
estimates from :mod:`jaxgrad.estimate`) into a selection of the n training sources (tasks,
skills, or clusters of samples):

* ``ensemble_scores`` scores source i by the mean estimate over the sampled subsets that contain
  it (the random-ensemble score), with a bootstrap confidence interval over subsets;
  ``select_top`` / ``select_threshold`` keep the best sources.
* ``forward_selection`` is true forward stepwise selection on a surrogate: each round scores
  every remaining candidate added to the current set in one batched call of ``score_fn``;
  ``ordered_selection`` is the paper's single pass that adds sources in score order and keeps
  each one that improves the estimate.
* Baselines: all sources, a random subset, and LESS-style gradient similarity (cosine of each
  source's mean projected gradient with the target's).

Conventions: sources are numbered 0…M-1; a subset is a boolean row over the M sources; every
score here is *higher is better* (pass ``-loss`` for a loss). Host-side bookkeeping (sampling,
masks, selections) returns NumPy arrays; numeric reductions return ``jax.Array``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.common.checks import check_feats, matmul_highest, nonnegative_float, positive_int
from jaxgrad.estimate.subsets import subset_size


# ----------------------------------------------------------------------------------------------
# Random ensemble
# ----------------------------------------------------------------------------------------------


class EnsembleScores(NamedTuple):
    """Per-source random-ensemble scores (M = number of sources).

    Attributes:
      scores: mean estimate over the subsets containing each source (NaN if none does).
      ci_low, ci_high: percentile bootstrap interval of the score, resampling subsets.
      counts: number of subsets containing each source.
    """

    scores: jax.Array
    ci_low: jax.Array
    ci_high: jax.Array
    counts: jax.Array


def ensemble_scores(subsets_SxM: np.typing.ArrayLike, estimates_S: jax.typing.ArrayLike, *,
                    n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> EnsembleScores:
    """Random-ensemble score of each source: the mean estimate of the subsets that contain it.

    Args:
      subsets_SxM: S×M booleans (from ``sample_subsets``).
      estimates_S: one finite, higher-is-better estimate per subset (negate a loss).
      n_boot: bootstrap replicates (each resamples the S subsets with replacement); 0 skips the
        interval (NaN bounds).
      ci: coverage of the percentile interval, in (0, 1).
      seed: seed of the resampling.

    Returns:
      ``EnsembleScores``. A source that no subset contains gets NaN score and bounds and count 0
      (with a warning); a bootstrap replicate in which a source drew no subset is left out of
      that source's interval.
    """
    subsets = np.asarray(subsets_SxM)
    if subsets.ndim != 2 or subsets.dtype != bool:
        raise ValueError(f"subsets_SxM must be a 2-D boolean array, got shape {subsets.shape} "
                         f"and dtype {subsets.dtype}")
    est = np.asarray(estimates_S, np.float64)
    if est.shape != (subsets.shape[0],):
        raise ValueError(f"estimates_S must have shape (S,) = ({subsets.shape[0]},) to match "
                         f"subsets_SxM {subsets.shape}, got {est.shape}")
    if not np.all(np.isfinite(est)):
        raise ValueError(f"estimates_S has {int(np.sum(~np.isfinite(est)))} NaN or inf entries")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be an int >= 0, got {n_boot!r}")
    if not 0.0 < float(ci) < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci!r}")
    counts = subsets.sum(axis=0)
    if np.any(counts == 0):
        warnings.warn(f"ensemble_scores: sources {np.flatnonzero(counts == 0).tolist()} are in "
                      "no subset; their scores are NaN", stacklevel=2)
    s_f = jnp.asarray(subsets, jnp.float32)
    e_f = jnp.asarray(est, jnp.float32)
    scores = _ratio(matmul_highest(e_f, s_f), jnp.asarray(counts, jnp.float32))
    if n_boot == 0 or subsets.shape[0] == 0:
        nan = jnp.full(scores.shape, jnp.nan, jnp.float32)
        return EnsembleScores(scores, nan, nan, jnp.asarray(counts, jnp.int32))
    low, high = _bootstrap(jax.random.key(seed), s_f, e_f, int(n_boot), float(ci))
    return EnsembleScores(scores, low, high, jnp.asarray(counts, jnp.int32))


def _ratio(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


@jax.jit(static_argnames=("n_boot",))
def _bootstrap_means(key, subsets_SxM, est_S, n_boot):
    """Means of the estimates per source for n_boot resamplings of the S subsets (B×M)."""
    n_subsets = subsets_SxM.shape[0]
    draws_BxS = jax.random.randint(key, (n_boot, n_subsets), 0, n_subsets)
    weights_BxS = jax.vmap(lambda d: jnp.bincount(d, length=n_subsets))(draws_BxS)
    weights_BxS = weights_BxS.astype(jnp.float32)
    sums_BxM = matmul_highest(weights_BxS, subsets_SxM * est_S[:, None])
    counts_BxM = matmul_highest(weights_BxS, subsets_SxM)
    return _ratio(sums_BxM, counts_BxM)


def _bootstrap(key, subsets_SxM, est_S, n_boot, ci):
    means_BxM = _bootstrap_means(key, subsets_SxM, est_S, n_boot=n_boot)
    tail = 100.0 * (1.0 - ci) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: never-sampled sources
        low, high = jnp.nanpercentile(means_BxM, jnp.array([tail, 100.0 - tail]), axis=0)
    return low, high


def select_top(scores_M: jax.typing.ArrayLike, k: float | int) -> np.ndarray:
    """Indices of the best sources, best first: a fraction in (0, 1] of the scored (non-NaN)
    sources (rounded, at least 1) or a count (:mod:`jaxgrad.common.counts`). Ties keep the lower index
    first."""
    scores = _check_scores(scores_M)
    valid = np.flatnonzero(~np.isnan(scores))
    if valid.size == 0:
        raise ValueError("select_top: every score is NaN")
    order = valid[np.argsort(-scores[valid], kind="stable")]
    return order[:subset_size(valid.size, k)]


def select_threshold(scores_M: jax.typing.ArrayLike, threshold: float) -> np.ndarray:
    """Indices of the sources scoring at least ``threshold`` (NaN never), best first."""
    scores = _check_scores(scores_M)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    keep = np.flatnonzero(scores >= threshold)
    return keep[np.argsort(-scores[keep], kind="stable")]


def _check_scores(scores_M) -> np.ndarray:
    scores = np.asarray(scores_M, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per source), got shape {scores.shape}")
    if np.any(np.isinf(scores)):
        raise ValueError("scores must not be infinite")
    return scores


# ----------------------------------------------------------------------------------------------
# Stepwise selection
# ----------------------------------------------------------------------------------------------


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
    """
    scores = _check_scores(scores_M)
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


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def baseline_all(n_sources: int) -> np.ndarray:
    """Every source (the "train on everything" baseline)."""
    return np.arange(positive_int("n_sources", n_sources))


def baseline_random(n_sources: int, size: float | int, seed: int = 0) -> np.ndarray:
    """A uniformly random subset of ``size`` sources (fraction or count), sorted."""
    count = subset_size(n_sources, size)
    return np.sort(np.random.default_rng(seed).choice(n_sources, size=count, replace=False))


def baseline_random_total(sizes: Sequence[int], total: int, seed: int = 0,
                          tries: int = 256) -> np.ndarray:
    """Random units whose sizes add up to about ``total`` samples, sorted (the random baseline
    when units are clusters of unequal sizes: the same amount of data as the selection).

    ``tries`` random orders of the units are drawn (``seed``); in each, the prefix whose total is
    closest to ``total`` is a candidate, and the first candidate of the smallest error is
    returned. A random prefix is a uniformly random set of its size, so the choice is random
    among sets of about the right size (exactly ``total`` whenever some random prefix hits it).

    Args:
      sizes: samples per unit (U non-negative ints).
      total: the number of samples wanted.
      tries: random orders drawn.

    Returns:
      Sorted unit indices (at least one).

    Raises:
      ValueError: ``sizes`` empty or negative.
    """
    sizes = np.asarray(sizes, np.int64)
    if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes < 0):
        raise ValueError(f"sizes must be a non-empty list of sample counts >= 0, got {sizes}")
    rng = np.random.default_rng(seed)
    best, best_err = None, None
    for _ in range(positive_int("tries", tries)):
        order = rng.permutation(sizes.size)
        err = np.abs(np.cumsum(sizes[order]) - int(total))
        j = int(np.argmin(err))
        if best_err is None or err[j] < best_err:
            best, best_err = order[: j + 1], err[j]
            if best_err == 0:
                break
    return np.sort(best.astype(int))


def gradient_similarity_scores(feats_NxK: jax.typing.ArrayLike,
                               source_ids_N: np.typing.ArrayLike,
                               target_feats_JxK: jax.typing.ArrayLike,
                               n_sources: int | None = None) -> jax.Array:
    """LESS-style scores: cosine of each source's mean projected gradient with the target's.

    Returns M cosines in [-1, 1], higher meaning more aligned; NaN for a source with no samples
    or a zero mean gradient.
    """
    x = check_feats("feats_NxK", feats_NxK)
    t = check_feats("target_feats_JxK", target_feats_JxK)
    if t.shape[1] != x.shape[1]:
        raise ValueError(f"target_feats_JxK has k = {t.shape[1]} columns but feats_NxK has "
                         f"k = {x.shape[1]}")
    if t.shape[0] == 0:
        raise ValueError("target_feats_JxK has no rows")
    ids = np.asarray(source_ids_N)
    if ids.shape != (x.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"source_ids_N must be {x.shape[0]} ints (one per row of feats_NxK), "
                         f"got shape {ids.shape} and dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"source_ids_N must be >= 0, got {ids.min()}")
    m = (int(ids.max()) + 1 if ids.size else 0) if n_sources is None else positive_int(
        "n_sources", n_sources)
    if ids.size and ids.max() >= m:
        raise ValueError(f"source_ids_N names source {ids.max()} but n_sources = {m}")
    return _cosine_to_target(jnp.asarray(x, jnp.float32), jnp.asarray(ids, jnp.int32),
                             jnp.asarray(t, jnp.float32), m)


def _cosine_to_target(x_NxK, ids_N, t_JxK, m):
    sums = jax.ops.segment_sum(x_NxK, ids_N, num_segments=m)
    counts = jax.ops.segment_sum(jnp.ones_like(ids_N, jnp.float32), ids_N, num_segments=m)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    target = jnp.mean(t_JxK, axis=0)
    denom = jnp.linalg.norm(means, axis=1) * jnp.linalg.norm(target)
    cos = matmul_highest(means, target) / jnp.where(denom > 0, denom, 1.0)
    return jnp.where((counts > 0) & (denom > 0), cos, jnp.nan)
