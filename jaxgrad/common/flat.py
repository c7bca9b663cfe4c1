"""Flat views of parameter pytrees: the fixed, documented order of the D trainable numbers.

Projected gradients, lifted updates (Δ = P w) and exact subset evaluation all need one agreed
order in which the leaves of a parameter tree are laid end to end. That order is
``jax.tree_util.tree_flatten_with_path`` order (keys sorted, as in every JAX pytree), each leaf
raveled in C order. ``FlatSpec`` records paths, shapes, dtypes and offsets so a D-vector can be
cut back into the tree, and so two runs can check that they agree on the layout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlatSpec:
    """Layout of a pytree flattened into one vector.

    Attributes:
      paths: ``jax.tree_util.keystr`` of each leaf, in flattening order.
      shapes: shape of each leaf.
      dtypes: dtype name of each leaf.
      offsets: start of each leaf in the flat vector.
      treedef: the pytree structure (not compared by ``==``).
    """

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]
    treedef: Any = dataclasses.field(compare=False, repr=False)

    @property
    def size(self) -> int:
        """D, the total number of entries."""
        if not self.shapes:
            return 0
        return self.offsets[-1] + math.prod(self.shapes[-1])

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    def to_json(self) -> dict:
        return {
            "paths": list(self.paths),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "size": self.size,
        }


def flat_spec(tree: Any) -> FlatSpec:
    """The layout of ``tree`` (arrays or ShapeDtypeStructs) without copying anything."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths, shapes, dtypes, offsets = [], [], [], []
    offset = 0
    for path, leaf in leaves_with_path:
        shape = tuple(int(s) for s in jnp.shape(leaf))
        paths.append(jax.tree_util.keystr(path))
        shapes.append(shape)
        dtypes.append(str(jnp.result_type(leaf)))
        offsets.append(offset)
        offset += math.prod(shape)
    return FlatSpec(tuple(paths), tuple(shapes), tuple(dtypes), tuple(offsets), treedef)


def flatten(tree: Any, dtype: Any = None) -> jax.Array:
    """Concatenate the leaves of ``tree`` (raveled, in ``FlatSpec`` order) into one vector.

    Leading batch axes are not supported here; use ``jax.vmap(flatten)`` for a batch of trees.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((0,), dtype or jnp.float32)
    parts = [jnp.ravel(x) if dtype is None else jnp.ravel(x).astype(dtype) for x in leaves]
    return jnp.concatenate(parts)


def unflatten(vec: jax.Array, spec: FlatSpec, cast: bool = True) -> Any:
    """Cut a D-vector back into the pytree described by ``spec``."""
    if vec.shape[-1] != spec.size:
        raise ValueError(f"unflatten: vector has {vec.shape[-1]} entries, the layout needs {spec.size}")
    leaves = []
    for off, n, shape, dt in zip(spec.offsets, spec.sizes, spec.shapes, spec.dtypes):
        leaf = vec[off : off + n].reshape(shape)
        leaves.append(leaf.astype(dt) if cast else leaf)
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


def tree_norm(tree: Any) -> jax.Array:
    """Euclidean norm of all leaves together, accumulated in float32."""
    sq = [jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.sqrt(sum(sq)) if sq else jnp.zeros((), jnp.float32)


def as_numpy_tree(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)
