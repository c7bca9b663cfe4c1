"""Clusters of training samples by their projected gradients: the units of ``groups.by = "cluster"``.

:func:`cluster_samples` groups samples whose projected per-sample gradients point alike:
agglomerative clustering with cosine distance and average linkage (SciPy; N(N-1)/2 distances), or
spherical k-means in JAX (k-means++ starts, Lloyd iterations, the best of a few restarts; no N×N
matrix). The paper's CoT protocol selects among such clusters instead of whole sources.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.common.checks import check_feats, matmul_highest, positive_int
from jaxgrad.config import GROUP_METHODS



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
    x = check_feats("feats_NxK", feats_NxK)
    n = x.shape[0]
    n_clusters = positive_int("n_clusters", n_clusters)
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
                                              jax.random.key(seed), positive_int("max_iter",
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
        return jnp.maximum(2.0 - 2.0 * matmul_highest(unit_NxK, unit_NxK[idx].T), 0.0)

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
        return jnp.argmax(matmul_highest(unit_NxK, centers.T), axis=1)

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
    score = jnp.sum(jnp.max(matmul_highest(unit_NxK, centers.T), axis=1))
    return labels, score
