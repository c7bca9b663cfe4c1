"""Projected per-sample gradients: ``jit(vmap(grad))`` fused with the random projection.

For every example i of a batch this computes ``f_i(θ*)`` and ``x_i = Pᵀ ∇_θ f_i(θ*)`` over the
trainable parameters θ only: the LoRA adapters (``nnx.LoRAParam``) by default, every parameter in
full fine-tuning. The flat order of the D trainable numbers is :mod:`jaxgrad.common.flat`'s: leaves of the
trainable ``nnx.State`` in pytree order (sorted module paths; ``lora_A`` before ``lora_B``), each
raveled in C order. Row ``d`` of P belongs to entry ``d`` of that vector.

The batch is cut into chunks of ``chunk_size`` examples, walked by ``lax.map`` inside one jitted
call. Per chunk, ``vmap(value_and_grad)`` gives the per-example gradient leaves; consecutive leaves
are concatenated in groups of up to 2^24 entries and each group is projected straight away
(``projector.project(group, offset)``) and summed, so at most one chunk's ``chunk_size × D``
gradients exist at any time (plus one group's copy) and nothing ``D × k`` ever does. The
projection is linear, so projecting group by group equals projecting the concatenated gradient.

With a mesh, the examples of each chunk are sharded over its ``data`` axis (parameters
replicated); results are identical to one device. Across hosts (``jax.distributed``) each process
computes its own slice of the examples; the gradient store merges the slices.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad._compat import moved_names
from jaxgrad.common.flat import flat_spec
from jaxgrad.gradients.outputs import get_output_fn
from jaxgrad.models.forward import MODEL_INPUTS, model_logits
from jaxgrad.models.lora import split_trainable, trainable_state


class PerSampleResult(NamedTuple):
    feats: jax.Array  # [N, k] projected gradients x_i = Pᵀ g_i
    f: jax.Array  # [N] output function values f_i(θ*)


GROUP_ENTRIES = 1 << 24  # leaves are projected in groups of up to this many entries per sample


def _leaf_groups(sizes) -> list[tuple[int, int]]:
    """Consecutive leaf ranges ``[start, stop)`` of at most GROUP_ENTRIES entries (or one leaf).

    Projecting a few concatenated leaves at once is much faster than one small leaf at a time
    (every projection call streams its own tiles of P), while the groups cap the extra copy of
    the chunk's gradients that the concatenation costs.
    """
    groups, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > GROUP_ENTRIES:
            groups.append((start, i))
            start, total = i, 0
        total += n
    if sizes:
        groups.append((start, len(sizes)))
    return groups


def _model_batch(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in MODEL_INPUTS if k in batch}


@functools.partial(jax.jit, static_argnames=("graphdef", "projector", "output_fn", "eps",
                                             "chunk_size", "data_sharding"))
def _projected_grads(graphdef, params, rest, batch, *, projector, output_fn, eps, chunk_size,
                     data_sharding):
    out_fn = get_output_fn(output_fn, eps)
    spec = flat_spec(params)

    def f_single(p, example):
        model = nnx.merge(graphdef, p, rest)
        one = jax.tree_util.tree_map(lambda x: x[None], example)
        logits = model_logits(model, one)
        return out_fn(logits, one["targets"], one["target_mask"])[0]

    def one_chunk(chunk):
        if data_sharding is not None:
            chunk = jax.lax.with_sharding_constraint(chunk, data_sharding)
        vals, grads = jax.vmap(jax.value_and_grad(f_single), in_axes=(None, 0))(params, chunk)
        feats = jnp.zeros((chunk_size, projector.k), jnp.float32)
        leaves = [leaf.reshape(chunk_size, -1) for leaf in jax.tree_util.tree_leaves(grads)]
        for start, stop in _leaf_groups(spec.sizes):
            g = leaves[start] if stop == start + 1 else jnp.concatenate(leaves[start:stop], axis=1)
            feats = feats + projector.project(g, offset=spec.offsets[start])
        return feats, vals

    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    chunks = jax.tree_util.tree_map(lambda x: x.reshape((n // chunk_size, chunk_size) + x.shape[1:]),
                                    batch)
    feats, vals = jax.lax.map(one_chunk, chunks)
    return feats.reshape(n, projector.k), vals.reshape(n)


def per_sample_projected_grads(model: nnx.Module, batch: dict, projector, output_fn: str = "logit_odds",
                               *, eps: float = 1e-6, chunk_size: int = 8, full_finetune: bool = False,
                               mesh: jax.sharding.Mesh | None = None) -> PerSampleResult:
    """Projected per-sample gradients and outputs for one batch.

    Args:
      model: a jaxgrad model (with LoRA adapters unless ``full_finetune``).
      batch: a batch dict from :mod:`jaxgrad.data.batching` (numpy or jax arrays).
      projector: a :class:`jaxgrad.gradients.projection.Projector` whose ``dim`` equals the
        number of trainable parameters.
      output_fn: ``"logit_odds"`` (the paper's) or ``"token_ce"``.
      eps: probability clipping of ``logit_odds``.
      chunk_size: examples per ``vmap`` chunk; bounds memory at chunk_size × D gradients.
      full_finetune: differentiate every parameter instead of the LoRA adapters (False on a
        model without adapters raises ValueError: :func:`jaxgrad.models.lora.trainable_filter`).
      mesh: shard each chunk's examples over this mesh's ``data`` axis.

    Returns:
      ``PerSampleResult(feats [N, k], f [N])`` in float32. Rows whose ``valid`` is 0 (padding
      rows) are computed like the rest; drop them by ``batch["valid"]``.
    """
    graphdef, params, rest = split_trainable(model, full_finetune)
    dim = flat_spec(params).size
    if projector.dim != dim:
        raise ValueError(f"projector.dim = {projector.dim} but the model has {dim} trainable "
                         f"parameters ({'all' if full_finetune else 'LoRA'}); build the "
                         "Projector with dim equal to that number")
    mb = _model_batch(batch)
    if "targets" not in mb or "target_mask" not in mb:
        raise ValueError("batch needs 'targets' and 'target_mask' (see jaxgrad.data.batching)")
    n = int(mb["input_ids"].shape[0])
    chunk = max(1, min(int(chunk_size), n))
    data_sharding = None
    if mesh is not None and mesh.shape.get("data", 1) > 1:
        data_size = mesh.shape["data"]
        chunk = int(np.ceil(chunk / data_size) * data_size)
        data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        # Parameters (restored onto one device, say) replicated over the mesh's devices.
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params, rest = jax.device_put((params, rest), replicated)
    pad = (-n) % chunk
    if pad:
        mb = {k: jnp.concatenate([v, jnp.repeat(v[-1:], pad, axis=0)]) for k, v in mb.items()}
    feats, vals = _projected_grads(graphdef, params, rest, mb, projector=projector,
                                   output_fn=output_fn, eps=float(eps), chunk_size=chunk,
                                   data_sharding=data_sharding)
    return PerSampleResult(feats[:n], vals[:n])


def num_trainable(model: nnx.Module, full_finetune: bool = False) -> int:
    """D: the number of parameters per-sample gradients are taken over.

    Args:
      model: an NNX model.
      full_finetune: count every ``nnx.Param`` instead of the LoRA adapters.

    Returns:
      D, an int (elements, not bytes).

    Raises:
      ValueError: LoRA mode on a model without adapters (:func:`trainable_filter`).
    """
    return flat_spec(trainable_state(model, full_finetune)).size


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
