"""The selections GradEx is compared with: all sources, random ones, gradient similarity.

:func:`baseline_all` and :func:`baseline_random` (a random subset of a size);
:func:`baseline_random_total` (random units whose samples add up to a total, for clusters of
unequal sizes); :func:`gradient_similarity_scores` (LESS-style: the cosine of each source's mean
projected gradient with the target's).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.common.checks import check_feats, matmul_highest, positive_int
from jaxgrad.estimate.subsets import subset_size


def baseline_all(n_sources: int) -> np.ndarray:
    """Every source (the "train on everything" baseline).

    Args:
      n_sources: M, the number of sources (a positive int).

    Returns:
      ``np.arange(M)``: the M source indices, int.

    Raises:
      TypeError / ValueError: ``n_sources`` not a positive int.
    """
    return np.arange(positive_int("n_sources", n_sources))


def baseline_random(n_sources: int, size: float | int, seed: int = 0) -> np.ndarray:
    """A uniformly random subset of ``size`` sources (fraction or count), sorted.

    Args:
      n_sources: M, the number of sources (a positive int).
      size: a fraction in (0, 1) of M or a count in [1, M] (:func:`subset_size`).
      seed: the seed of ``numpy.random.default_rng`` (drawn without replacement).

    Returns:
      The chosen source indices, int, sorted ascending.

    Raises:
      TypeError / ValueError: ``n_sources`` or ``size`` invalid (:func:`subset_size`).
    """
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

    The score of source i is cos(mean_{n: source n = i} x_n, mean_j t_j), computed in float32
    (the source-level analogue of LESS, Xia et al. 2024, which scores single samples).

    Args:
      feats_NxK: N×k projected gradients of the training samples, real.
      source_ids_N: [N] int source (0…M-1) of each row of ``feats_NxK``.
      target_feats_JxK: J×k projected gradients of the target samples (J >= 1).
      n_sources: M (default: max(source_ids_N) + 1).

    Returns:
      [M] float32 cosines in [-1, 1], higher meaning more aligned; NaN for a source with no
      samples or a zero mean gradient.

    Raises:
      ValueError: features not 2-D or with NaN/inf rows; k differing between the two; no target
        rows; ``source_ids_N`` not N ints >= 0 or naming a source >= ``n_sources``.
      TypeError: non-real features; ``n_sources`` not an int.
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
