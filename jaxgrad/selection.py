"""Choosing data sources from subset estimates: random ensembles, thresholds, stepwise search.

GradEx's last step (DESIGN.md step 5) turns per-subset estimates into a selection of the n
training sources (tasks, skills, or clusters of samples):

* ``sample_subsets`` draws m random subsets of the sources (e.g. 1000 subsets of half of them),
  ``masks_from_sources`` expands them to the S×N sample masks ``surrogate.fit_subsets`` takes.
* ``ensemble_scores`` scores source i by the mean estimate over the sampled subsets that contain
  it (the random-ensemble score), with a bootstrap confidence interval over subsets;
  ``select_top`` / ``select_threshold`` keep the best sources.
* ``forward_selection`` is true forward stepwise selection on a surrogate: each round scores
  every remaining candidate added to the current set in one batched call of ``score_fn``;
  ``ordered_selection`` is the paper's single pass that adds sources in score order and keeps
  each one that improves the estimate.
* ``cluster_samples`` groups samples with similar projected gradients (agglomerative with cosine
  distance and average linkage, or spherical k-means in JAX), so that a "source" can be a
  cluster.
* Baselines: all sources, a random subset, and LESS-style gradient similarity (cosine of each
  source's mean projected gradient with the target's).

Conventions: sources are numbered 0…M-1; a subset is a boolean row over the M sources; every
score here is *higher is better* (pass ``-loss`` for a loss). Host-side bookkeeping (sampling,
masks, selections) returns NumPy arrays; numeric reductions return ``jax.Array``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.common.counts import fraction_or_count
from jaxgrad.config import GROUP_METHODS

_ENUMERATE_LIMIT = 200_000  # enumerate all subsets of a size when there are at most this many


# ----------------------------------------------------------------------------------------------
# Subsets and masks
# ----------------------------------------------------------------------------------------------


def subset_size(n_sources: int, size: float | int, *, name: str = "size") -> int:
    """The number of sources in a subset, under :mod:`jaxgrad.common.counts`' rule: a fraction in
    (0, 1) of ``n_sources`` (rounded, at least 1) or a whole count in [1, n_sources], whatever
    the Python type (``2`` and ``2.0`` are both two sources; ``1.0`` is one).

    Raises:
      TypeError / ValueError: naming ``name``, as :func:`jaxgrad.common.counts.fraction_or_count`.
    """
    n_sources = _positive_int("n_sources", n_sources)
    return fraction_or_count(size, n_sources, name=name, at_least_one=True)


def sample_subsets(n_sources: int, m: int, size: float | int, seed: int = 0) -> np.ndarray:
    """m random subsets of ``size`` sources each, as an m×n_sources boolean array.

    Subsets are distinct whenever m does not exceed the number C(n, size) of distinct subsets;
    past that every distinct subset appears once and the rest repeat (with a warning).
    Reproducible for a given seed.
    """
    n_sources = _positive_int("n_sources", n_sources)
    m = _positive_int("m", m)
    count = subset_size(n_sources, size)
    rng = np.random.default_rng(seed)
    n_distinct = math.comb(n_sources, count)
    if m > n_distinct > _ENUMERATE_LIMIT:
        raise ValueError(f"sample_subsets: m = {m} exceeds the {n_distinct} distinct subsets of "
                         f"{count} of {n_sources} sources")
    if m > n_distinct // 4 and n_distinct <= _ENUMERATE_LIMIT:
        # Few distinct subsets compared with m: enumerate them and draw without replacement.
        all_subsets = _all_subsets(n_sources, count)
        if m > n_distinct:
            warnings.warn(f"sample_subsets: only {n_distinct} distinct subsets of {count} of "
                          f"{n_sources} sources exist; {m - n_distinct} of the {m} repeat",
                          stacklevel=2)
            extra = rng.integers(0, n_distinct, size=m - n_distinct)
            order = np.concatenate([rng.permutation(n_distinct), extra])
        else:
            order = rng.choice(n_distinct, size=m, replace=False)
        return all_subsets[order]
    out = np.zeros((m, n_sources), bool)
    seen: set[bytes] = set()
    filled = 0
    while filled < m:
        pick = np.argsort(rng.random(n_sources))[:count]
        row = np.zeros(n_sources, bool)
        row[pick] = True
        key = np.packbits(row).tobytes()
        if key in seen:
            continue
        seen.add(key)
        out[filled] = row
        filled += 1
    return out


def _all_subsets(n: int, count: int) -> np.ndarray:
    combos = np.array(list(itertools.combinations(range(n), count)), dtype=np.int64)
    out = np.zeros((len(combos), n), bool)
    out[np.arange(len(combos))[:, None], combos] = True
    return out


def masks_from_sources(source_ids_N: np.typing.ArrayLike, subsets: np.typing.ArrayLike | Sequence,
                       n_sources: int | None = None) -> np.ndarray:
    """Sample masks S×N from subsets of sources.

    Args:
      source_ids_N: the source (0…M-1) of each of the N samples.
      subsets: an S×M boolean array, or S sequences of source indices.
      n_sources: M (default: the width of a boolean ``subsets``, else max(source_ids) + 1).

    Returns:
      S×N booleans: sample i is in subset s iff its source is.
    """
    ids = np.asarray(source_ids_N)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"source_ids_N must be a 1-D array of ints, got shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"source_ids_N must be >= 0, got {ids.min()}")
    subsets_arr = _subsets_matrix(subsets, n_sources, int(ids.max()) + 1 if ids.size else 0)
    m = subsets_arr.shape[1]
    if ids.size and ids.max() >= m:
        raise ValueError(f"source_ids_N names source {ids.max()} but the subsets cover only "
                         f"{m} sources (0…{m - 1})")
    return subsets_arr[:, ids]


def _subsets_matrix(subsets, n_sources: int | None, inferred: int) -> np.ndarray:
    arr = subsets if isinstance(subsets, np.ndarray) else None
    if arr is None and hasattr(subsets, "dtype") and hasattr(subsets, "shape"):
        arr = np.asarray(subsets)
    if arr is not None and arr.dtype == bool:
        if arr.ndim != 2:
            raise ValueError(f"subsets must be 2-D (S × sources), got shape {arr.shape}")
        if n_sources is not None and arr.shape[1] != n_sources:
            raise ValueError(f"subsets has {arr.shape[1]} columns but n_sources = {n_sources}")
        return arr
    m = inferred if n_sources is None else _positive_int("n_sources", n_sources)
    rows = list(subsets)
    out = np.zeros((len(rows), m), bool)
    for s, row in enumerate(rows):
        idx = np.asarray(row, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= m):
            bad = idx[(idx < 0) | (idx >= m)]
            raise ValueError(f"subset {s} names unknown source(s) {bad.tolist()}; sources are "
                             f"0…{m - 1}")
        out[s, idx] = True
    return out


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
    scores = _ratio(_mm(e_f, s_f), jnp.asarray(counts, jnp.float32))
    if n_boot == 0 or subsets.shape[0] == 0:
        nan = jnp.full(scores.shape, jnp.nan, jnp.float32)
        return EnsembleScores(scores, nan, nan, jnp.asarray(counts, jnp.int32))
    low, high = _bootstrap(jax.random.key(seed), s_f, e_f, int(n_boot), float(ci))
    return EnsembleScores(scores, low, high, jnp.asarray(counts, jnp.int32))


def _ratio(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def _mm(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


@jax.jit(static_argnames=("n_boot",))
def _bootstrap_means(key, subsets_SxM, est_S, n_boot):
    """Means of the estimates per source for n_boot resamplings of the S subsets (B×M)."""
    n_subsets = subsets_SxM.shape[0]
    draws_BxS = jax.random.randint(key, (n_boot, n_subsets), 0, n_subsets)
    weights_BxS = jax.vmap(lambda d: jnp.bincount(d, length=n_subsets))(draws_BxS)
    weights_BxS = weights_BxS.astype(jnp.float32)
    sums_BxM = _mm(weights_BxS, subsets_SxM * est_S[:, None])
    counts_BxM = _mm(weights_BxS, subsets_SxM)
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
    n_sources = _positive_int("n_sources", n_sources)
    max_size = n_sources if max_size is None else _positive_int("max_size", max_size)
    if max_size > n_sources:
        raise ValueError(f"max_size must be <= n_sources = {n_sources}, got {max_size}")
    min_gain = _nonnegative_float("min_gain", min_gain)
    current = np.zeros(n_sources, bool)
    selected: list[int] = []
    path: list[float] = []
    best_score = None
    initial = float("nan")
    n_calls = n_evaluated = 0
    while len(selected) < max_size:
        candidates = np.flatnonzero(~current)
        rows = np.repeat(current[None, :], len(candidates), axis=0)
        rows[np.arange(len(candidates)), candidates] = True
        if best_score is None:
            rows = np.concatenate([current[None, :], rows])
        scores = _call_score_fn(score_fn, rows)
        n_calls += 1
        n_evaluated += len(rows)
        if best_score is None:
            best_score, scores = float(scores[0]), scores[1:]
            initial = best_score
        j = int(np.argmax(scores))
        if not scores[j] > best_score + min_gain:
            break
        current[candidates[j]] = True
        selected.append(int(candidates[j]))
        best_score = float(scores[j])
        path.append(best_score)
    return StepwiseResult(selected, path, initial, n_calls, n_evaluated)


def ordered_selection(scores_M: jax.typing.ArrayLike, score_fn: ScoreFn, *,
                      min_gain: float = 0.0) -> StepwiseResult:
    """The paper's single ordered pass: visit sources by decreasing score (NaN scores skipped),
    add each to the current set and keep it if ``score_fn`` improves by more than ``min_gain``.

    One ``score_fn`` call per visited source (the first call also scores the empty set).
    """
    scores = _check_scores(scores_M)
    min_gain = _nonnegative_float("min_gain", min_gain)
    n_sources = scores.shape[0]
    valid = np.flatnonzero(~np.isnan(scores))
    order = valid[np.argsort(-scores[valid], kind="stable")]
    current = np.zeros(n_sources, bool)
    selected: list[int] = []
    path: list[float] = []
    best_score = None
    initial = float("nan")
    n_calls = n_evaluated = 0
    for source in order:
        trial = current.copy()
        trial[source] = True
        rows = trial[None, :] if best_score is not None else np.stack([current, trial])
        out = _call_score_fn(score_fn, rows)
        n_calls += 1
        n_evaluated += len(rows)
        if best_score is None:
            best_score = initial = float(out[0])
        if out[-1] > best_score + min_gain:
            current = trial
            selected.append(int(source))
            best_score = float(out[-1])
            path.append(best_score)
    return StepwiseResult(selected, path, initial, n_calls, n_evaluated)


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
# Clustering
# ----------------------------------------------------------------------------------------------


def cluster_samples(feats_NxK: jax.typing.ArrayLike, n_clusters: int, *,
                    method: str = "agglomerative", seed: int = 0,
                    max_iter: int = 100) -> jax.Array:
    """Groups samples with similar projected gradients; returns a cluster id (0…n-1) per sample.

    Args:
      feats_NxK: projected gradients, finite; rows of zero norm are rejected by
        ``agglomerative`` (no cosine distance) and left in cluster 0's Voronoi cell by
        ``kmeans``.
      n_clusters: number of clusters, in [1, N].
      method: ``"agglomerative"``: average linkage on cosine distance (scipy; O(N²) memory, for
        N up to ~20k), cut into exactly ``n_clusters``. ``"kmeans"``: spherical k-means in JAX
        on L2-normalised rows (k-means++ seeding from ``seed``, Lloyd steps until assignments
        stop changing or ``max_iter``).
      seed: k-means seed.
      max_iter: k-means iteration cap.

    Returns:
      N int32 cluster ids; clusters are numbered by their first sample (sample 0 is in cluster
      0, the first sample not in cluster 0 is in cluster 1, ...).
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"method must be one of {GROUP_METHODS}, got {method!r}")
    x = _check_feats("feats_NxK", feats_NxK)
    n = x.shape[0]
    n_clusters = _positive_int("n_clusters", n_clusters)
    if n_clusters > n:
        raise ValueError(f"n_clusters must be <= N = {n}, got {n_clusters}")
    norms = np.linalg.norm(x, axis=1)
    if method == "agglomerative":
        if np.any(norms == 0):
            raise ValueError(f"feats_NxK has {int(np.sum(norms == 0))} rows of zero norm: the "
                             "cosine distance is undefined for them (drop them, or use "
                             "method='kmeans')")
        from scipy.cluster import hierarchy
        from scipy.spatial import distance

        if n == 1:
            labels = np.zeros(1, np.int64)
        else:
            tree = hierarchy.linkage(distance.pdist(x, metric="cosine"), method="average")
            labels = hierarchy.cut_tree(tree, n_clusters=n_clusters).reshape(-1)
    else:
        unit = x / np.where(norms > 0, norms, 1.0)[:, None]
        labels = np.asarray(_spherical_kmeans(jnp.asarray(unit, jnp.float32), n_clusters,
                                              jax.random.key(seed), _positive_int("max_iter",
                                                                                   max_iter)))
    return jnp.asarray(_renumber(labels), jnp.int32)


def _renumber(labels: np.ndarray) -> np.ndarray:
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    mapping = np.empty(order.size, np.int64)
    mapping[order] = np.arange(order.size)
    return mapping[np.searchsorted(np.unique(labels), labels)]


_KMEANS_RESTARTS = 4


def _spherical_kmeans(unit_NxK: jax.Array, n_clusters: int, key: jax.Array,
                      max_iter: int) -> jax.Array:
    """Best of ``_KMEANS_RESTARTS`` runs (greedy k-means++ seeding, then Lloyd), by the total
    cosine of the samples to their centers."""
    keys = jax.random.split(key, _KMEANS_RESTARTS)
    labels_RxN, score_R = jax.vmap(
        lambda k: _kmeans_run(unit_NxK, k, n_clusters, max_iter))(keys)
    return labels_RxN[jnp.argmax(score_R)]


@jax.jit(static_argnames=("n_clusters",))
def _kmeans_run(unit_NxK, key, n_clusters, max_iter):
    centers = _kmeans_pp(unit_NxK, n_clusters, key)
    return _lloyd(unit_NxK, centers, max_iter)


def _kmeans_pp(unit_NxK, n_clusters, key):
    """Greedy k-means++ seeding (2 + ⌊ln k⌋ candidates per step, keeping the one that lowers
    the potential most) with the squared chord distance 2 - 2·cos on unit rows."""
    n = unit_NxK.shape[0]
    n_trials = 2 + int(math.log(n_clusters))

    def chord(idx):
        return jnp.maximum(2.0 - 2.0 * _mm(unit_NxK, unit_NxK[idx].T), 0.0)

    key, sub = jax.random.split(key)
    first = jax.random.randint(sub, (), 0, n)
    centers = jnp.zeros((n_clusters, unit_NxK.shape[1]), unit_NxK.dtype).at[0].set(unit_NxK[first])
    dist_N = chord(first)

    def step(c, carry):
        centers, dist_N, key = carry
        key, sub = jax.random.split(key)
        total = jnp.sum(dist_N)
        probs = jnp.where(total > 0, dist_N / jnp.where(total > 0, total, 1.0), 1.0 / n)
        trials = jax.random.choice(sub, n, (n_trials,), p=probs)
        dist_NxT = jnp.minimum(dist_N[:, None], chord(trials))
        best = jnp.argmin(jnp.sum(dist_NxT, axis=0))
        return centers.at[c].set(unit_NxK[trials[best]]), dist_NxT[:, best], key

    centers, _, _ = jax.lax.fori_loop(1, n_clusters, step, (centers, dist_N, key))
    return centers


def _lloyd(unit_NxK, centers_CxK, max_iter):
    """Lloyd steps for spherical k-means; returns (labels, total cosine to the centers)."""
    n_clusters = centers_CxK.shape[0]

    def assign(centers):
        return jnp.argmax(_mm(unit_NxK, centers.T), axis=1)

    def update(labels, centers):
        sums = jax.ops.segment_sum(unit_NxK, labels, num_segments=n_clusters)
        norms = jnp.linalg.norm(sums, axis=1, keepdims=True)
        # An empty (or cancelling) cluster keeps its previous center.
        return jnp.where(norms > 0, sums / jnp.where(norms > 0, norms, 1.0), centers)

    def cond(carry):
        it, _, _, changed = carry
        return (it < max_iter) & changed

    def body(carry):
        it, labels, centers, _ = carry
        centers = update(labels, centers)
        new = assign(centers)
        return it + 1, new, centers, jnp.any(new != labels)

    labels = assign(centers_CxK)
    _, labels, centers, _ = jax.lax.while_loop(cond, body, (0, labels, centers_CxK, True))
    score = jnp.sum(jnp.max(_mm(unit_NxK, centers.T), axis=1))
    return labels, score


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def baseline_all(n_sources: int) -> np.ndarray:
    """Every source (the "train on everything" baseline)."""
    return np.arange(_positive_int("n_sources", n_sources))


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
    for _ in range(_positive_int("tries", tries)):
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
    x = _check_feats("feats_NxK", feats_NxK)
    t = _check_feats("target_feats_JxK", target_feats_JxK)
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
    m = (int(ids.max()) + 1 if ids.size else 0) if n_sources is None else _positive_int(
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
    cos = _mm(means, target) / jnp.where(denom > 0, denom, 1.0)
    return jnp.where((counts > 0) & (denom > 0), cos, jnp.nan)


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _check_feats(name: str, feats) -> np.ndarray:
    x = np.asarray(feats)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows × k), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = ~np.all(np.isfinite(x), axis=1)
    if bad.any():
        raise ValueError(f"{name} has NaN or inf in {int(bad.sum())} of {x.shape[0]} rows "
                         f"(first: row {int(np.argmax(bad))})")
    return x


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _nonnegative_float(name: str, value) -> float:
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return out
