"""jaxgrad.groups.clusters: cluster_samples recovers planted clusters (cosine, norms over three
decades) and refuses bad input."""

from __future__ import annotations

import numpy as np
import pytest

from jaxgrad.groups.clusters import cluster_samples


def _planted_clusters(seed=0):
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(10, 4)))[0].T  # 4 orthonormal directions
    truth = rng.integers(0, 4, size=120)
    feats = directions[truth] + 0.15 * rng.normal(size=(120, 10))
    # Norms over three decades: only the direction defines a cluster (cosine).
    feats *= np.exp(rng.uniform(-3.0, 3.0, size=120))[:, None]
    return feats.astype(np.float32), truth


@pytest.mark.parametrize("method", ["agglomerative", "kmeans"])
def test_cluster_samples_recovers_planted_clusters(method):
    feats, truth = _planted_clusters()
    labels = np.asarray(cluster_samples(feats, 4, method=method, seed=0))
    assert labels.shape == (120,) and set(labels) == {0, 1, 2, 3}
    pairs = {(t, p) for t, p in zip(truth, labels, strict=True)}
    assert len(pairs) == 4, f"{method}: clusters do not match the planted ones: {sorted(pairs)}"
    first_seen = [labels[np.argmax(labels == c)] for c in range(4)]
    assert labels[0] == 0 and np.all(np.diff(np.unique(labels, return_index=True)[1]) > 0), (
        f"clusters must be numbered by first sample, got {first_seen}")


def test_cluster_samples_rejects_bad_input():
    feats, _ = _planted_clusters()
    bad = feats.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 1 of 120 rows \(first: row 5\)"):
        cluster_samples(bad, 3)
    with pytest.raises(ValueError, match="n_clusters must be <= N = 120"):
        cluster_samples(feats, 121)
    zero = feats.copy()
    zero[7] = 0.0
    with pytest.raises(ValueError, match="1 rows of zero norm"):
        cluster_samples(zero, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        cluster_samples(feats, 3, method="dbscan")
