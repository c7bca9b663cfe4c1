"""The random-ensemble score of each source and the selection it gives (GradEx step 5).

:func:`ensemble_scores` scores source i by the mean estimate over the sampled subsets that contain
it, with a percentile-bootstrap interval over subsets; :func:`select_top` and
:func:`select_threshold` keep the best sources.

Conventions of :mod:`jaxgrad.select`: sources are numbered 0…M-1; a subset is a boolean row over
the M sources; every score is *higher is better* (pass ``-loss`` for a loss). Host-side
bookkeeping returns NumPy arrays; numeric reductions return ``jax.Array``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.common.checks import matmul_highest
from jaxgrad.estimate.subsets import subset_size




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

    >>> subsets = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], bool)
    >>> out = ensemble_scores(subsets, [-0.2, -0.5, -0.3], n_boot=0)
    >>> [round(float(x), 3) for x in out.scores], np.asarray(out.counts).tolist()
    ([-0.25, -0.35, -0.4], [2, 2, 2])
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
    sources (rounded, at least 1) or a count (:mod:`jaxgrad.common.counts`). Ties keep the lower
    index first. GradEx step 5 (top sources by their ensemble score).

    Args:
      scores_M: [M] scores, higher is better (e.g. ``EnsembleScores.scores``); NaN = unscored.
      k: a fraction in (0, 1) of the scored sources or a count, at most their number.

    Returns:
      int source indices, best first.

    Raises:
      ValueError: ``scores_M`` not 1-D or with an inf; every score NaN; ``k`` above the number
        of scored sources or otherwise outside :mod:`jaxgrad.common.counts`' rule.
      TypeError: ``k`` not a number.

    >>> select_top([0.1, float("nan"), 0.5, 0.3], 2).tolist()   # the NaN source is not scored
    [2, 3]
    >>> select_top([0.1, float("nan"), 0.5, 0.3], 0.5).tolist()  # half of the 3 scored, rounded
    [2, 3]
    """
    scores = check_scores(scores_M)
    valid = np.flatnonzero(~np.isnan(scores))
    if valid.size == 0:
        raise ValueError("select_top: every score is NaN")
    order = valid[np.argsort(-scores[valid], kind="stable")]
    return order[:subset_size(valid.size, k)]


def select_threshold(scores_M: jax.typing.ArrayLike, threshold: float) -> np.ndarray:
    """Indices of the sources scoring at least ``threshold`` (NaN never), best first.

    Args:
      scores_M: [M] scores, higher is better; NaN = unscored.
      threshold: the least score kept (same units as the scores).

    Returns:
      int source indices with score >= ``threshold``, best first (ties: lower index first); may
      be empty.

    Raises:
      ValueError: ``scores_M`` not 1-D or with an inf, or ``threshold`` NaN.
    """
    scores = check_scores(scores_M)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    keep = np.flatnonzero(scores >= threshold)
    return keep[np.argsort(-scores[keep], kind="stable")]


def check_scores(scores_M) -> np.ndarray:
    scores = np.asarray(scores_M, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per source), got shape {scores.shape}")
    if np.any(np.isinf(scores)):
        raise ValueError("scores must not be infinite")
    return scores


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------
