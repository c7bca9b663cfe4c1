"""Validated inputs and the subset-sharded layout shared by the fits and the estimates.

The checks turn user arrays into JAX arrays of one float dtype (float32, or float64 under
``jax_enable_x64``) and raise a ``ValueError`` / ``TypeError`` naming the argument, its shape and
what was expected: features ``N×k`` with finite rows (:func:`check_feats`), masks ``S×N``
(:func:`check_masks`), labels, vectors, coefficients, lift factors. :func:`subset_sharding` lays
subsets (rows) over a mesh's ``data`` axis; :func:`gather_from_mesh` brings a sharded result back
to every process.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

HIGHEST = lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators: fits need float32
CHUNK_ELEMENTS = 2**23  # default chunk: S_chunk·N about 8M (32 MB per float32 S×N array)


def subset_sharding(mesh):
    """Rows (subsets) over the mesh's ``data`` axis; None without a mesh or with one device."""
    if mesh is None or mesh.shape.get("data", 1) * mesh.shape.get("model", 1) <= 1:
        return None
    if mesh.shape.get("model", 1) > 1:
        raise ValueError(f"fit_subsets: mesh {dict(mesh.shape)}: subsets shard over 'data' only; "
                         "give a mesh whose 'model' axis has size 1")
    # Auto axes: the solver's while_loop carries unannotated arrays (an Explicit-axes mesh, the
    # default of jax.make_mesh, would type them as sharded and refuse the loop).
    auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    return jax.sharding.NamedSharding(auto, jax.sharding.PartitionSpec("data", None))


def gather_from_mesh(tree):
    """Every entry of a sharded result on this process (gathered from the other processes)."""
    if jax.process_count() > 1:
        return jax.tree_util.tree_map(
            lambda x: jnp.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, jax.devices()[0]), tree)


def float_dtype(x: np.ndarray | jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 8:
        return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return jnp.float32


def check_feats(name: str, feats: Any) -> jax.Array:
    arr = np.asarray(feats) if not isinstance(feats, jax.Array) else feats
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows × k), got shape {tuple(arr.shape)}")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    x = jnp.asarray(arr, float_dtype(arr))
    bad_rows = ~jnp.all(jnp.isfinite(x), axis=1)
    n_bad = int(jnp.sum(bad_rows))
    if n_bad:
        first = int(jnp.argmax(bad_rows))
        raise ValueError(f"{name} has NaN or inf in {n_bad} of {x.shape[0]} rows (first: row "
                         f"{first}); drop or recompute those samples before fitting")
    return x


def check_masks(masks: Any, n: int) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim != 2:
        raise ValueError(f"masks_SxN must be 2-D (subsets × samples), got shape {m.shape}")
    if m.shape[1] != n:
        raise ValueError(f"masks_SxN has shape {m.shape}: its {m.shape[1]} columns must match "
                         f"the N = {n} rows of feats_NxK")
    if m.dtype == bool:
        return m
    if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
        raise TypeError(f"masks_SxN must be boolean or numeric weights, got dtype {m.dtype}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("masks_SxN weights must be finite and non-negative")
    return m


def check_labels(labels: Any, n: int) -> jax.Array:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape (N,) = ({n},), got {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:5]}")
    return jnp.asarray(y.astype(np.int32))


def check_vector(name: str, values: Any, n: int, dtype: Any) -> jax.Array:
    arr = np.asarray(values) if not isinstance(values, jax.Array) else values
    if tuple(arr.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(arr.shape)}")
    x = jnp.asarray(arr, dtype)
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} has NaN or inf entries")
    return x


def check_coef(coef: Any) -> jax.Array:
    arr = np.asarray(coef) if not isinstance(coef, jax.Array) else coef
    if arr.ndim != 2:
        raise ValueError(f"coef_SxK must be 2-D (subsets × k), got shape {tuple(arr.shape)}")
    return jnp.asarray(arr, float_dtype(arr))


def check_factors(c: Any, n_subsets: int, dtype: Any) -> jax.Array:
    arr = jnp.asarray(c, dtype)
    if arr.ndim == 0:
        arr = jnp.full((n_subsets,), arr)
    if arr.shape != (n_subsets,):
        raise ValueError(f"c_S must be a scalar or have shape (S,) = ({n_subsets},), "
                         f"got {arr.shape}")
    if not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError("c_S has NaN or inf entries")
    return arr
