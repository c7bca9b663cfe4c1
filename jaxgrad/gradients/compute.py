"""Stage 2: projected per-sample gradients of a dataset into a resumable gradient store.

``compute_gradient_store`` walks the store's missing shards (a killed run continues at the first
one), batches each shard's examples with fixed bucketed shapes, computes ``x_i = Pᵀ ∇f_i(θ*)``
and ``f_i(θ*)`` with :func:`jaxgrad.gradients.per_sample.per_sample_projected_grads` and writes
the shard atomically. The store's manifest pins the model, a fingerprint of θ* (the trainable weights), the
output function and the projector, so later stages cannot mix gradients of different runs.

With several processes (``jax.distributed``), process p computes the shards i with
``i % process_count == p`` on its local devices; process 0 merges once all are done.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from jaxgrad.common.progress import progress_bar
from jaxgrad.config import GradientsConfig, TrainConfig
from jaxgrad.data.batching import collate
from jaxgrad.gradients.manifest import read_manifest
from jaxgrad.gradients.per_sample import per_sample_projected_grads
from jaxgrad.gradients.store import GradientStore
from jaxgrad.models.forward import encode_for_model
from jaxgrad.models.lora import trainable_state


def params_fingerprint(state: Any) -> str:
    """sha256 over the paths, shapes, dtypes and bytes of a parameter tree (θ* identity)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.shape).encode() + str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def projector_identity(projector) -> dict:
    return {"seed": int(projector.seed), "kind": str(projector.kind), "dim": int(projector.dim),
            "k": int(projector.k)}


def compute_gradient_store(model: nnx.Module, examples: Sequence[dict], tokenizer, projector, path: str,
                           *, split: str, sources: Sequence[str] | None = None,
                           output_fn: str = GradientsConfig.output_fn,
                           eps: float = GradientsConfig.eps,
                           batch_size: int = GradientsConfig.batch_size,
                           chunk_size: int = GradientsConfig.chunk_size,
                           shard_size: int = GradientsConfig.shard_size,
                           max_length: int = TrainConfig.max_length,
                           dtype: str = GradientsConfig.dtype, model_id: str | None = None,
                           full_finetune: bool = False, mesh=None, process_index: int = 0,
                           process_count: int = 1, progress: bool = False) -> GradientStore:
    """Compute (or finish computing) the gradient store of ``examples`` at ``path`` (GradEx
    step 2: ``x_i = Pᵀ∇f_i(θ*)``, k floats per example, and ``f_i(θ*)``).

    Args:
      model: θ*, the fine-tuned NNX model (its trainable split gives D and the fingerprint).
      examples: N example dicts (``example_id``, ``source``, and the text fields
        :func:`jaxgrad.models.forward.encode_for_model` encodes); one store row each, in order.
      tokenizer: the model's tokenizer (a ``transformers`` tokenizer or the char tokenizer).
      projector: the :class:`~jaxgrad.gradients.projection.Projector` P (``dim`` = D, ``k``).
      path: the store directory; an existing store there is resumed if it matches.
      split: the split name recorded in the manifest (``"train"``, ``"target_val"``).
      sources: the list ``source_index`` indexes (default: the sorted distinct sources).
      model_id: the model's name or path recorded in the manifest.
      full_finetune: differentiate every parameter instead of the LoRA adapters.
      mesh, process_index, process_count: the devices and this process's share of the shards.
      progress: show a bar over the missing shards.

    The other keyword defaults are the config's ``gradients`` keys
    (:class:`jaxgrad.config.GradientsConfig` declares and documents them); ``max_length``, where
    sequences are truncated, is meta-training's (``train.max_length``).

    Returns:
      The :class:`GradientStore`; complete when this process is the only one, otherwise after
      ``GradientStore.merge(path)`` by process 0.

    Raises:
      StoreMismatchError: ``path`` holds a store of other examples, θ*, projector or settings.
      ValueError: LoRA mode on a model without adapters, an unknown ``output_fn``, bad
        arguments (as :meth:`GradientStore.create_or_resume`).
    """
    trainable = trainable_state(model, full_finetune)
    store = GradientStore.create_or_resume(
        path, example_ids=[e["example_id"] for e in examples], source_ids=[e["source"] for e in examples],
        k=projector.k, projector=projector_identity(projector),
        checkpoint={"fingerprint": params_fingerprint(trainable)},
        output_fn={"name": output_fn, "eps": float(eps)}, split=split, dtype=dtype,
        shard_size=shard_size, model=model_id, process_index=process_index,
        process_count=process_count)
    missing = store.missing_shards()
    if not missing:
        return store
    encoded, arch = encode_for_model(examples, tokenizer, model, sources=sources)
    # Closed however the loop ends: no bar line after what an interruption prints.
    with progress_bar(missing, desc=f"gradients[{split}]", unit="shard",
                      disable=not progress) as shards:
        for i in shards:
            start, stop = store.shard_rows(i)
            feats, fs = [], []
            for b0 in range(start, stop, batch_size):
                rows = list(range(b0, min(b0 + batch_size, stop)))
                batch = collate(encoded, rows, max_length=max_length, arch=arch,
                                batch_size=batch_size)
                res = per_sample_projected_grads(model, batch, projector, output_fn, eps=eps,
                                                 chunk_size=chunk_size,
                                                 full_finetune=full_finetune, mesh=mesh)
                n = len(rows)
                feats.append(np.asarray(res.feats)[:n])
                fs.append(np.asarray(res.f)[:n])
            store.write_shard(i, np.concatenate(feats), np.concatenate(fs))
    return store


def store_model_id(name_or_path: str, workdir: str, store_path: str) -> str:
    """The ``model`` a gradient store records: a base model inside the run directory (the demo's
    ``<workdir>/base``) relative to it, so that a copied or moved run directory still resumes an
    interrupted store (θ* itself is identified by the ``checkpoint`` fingerprint). A partial
    store written before this rule, with the absolute form of the same path, keeps its value."""
    full, root = os.path.abspath(os.path.expanduser(name_or_path)), os.path.abspath(workdir)
    if not (os.path.exists(full) and os.path.commonpath([full, root]) == root):
        return name_or_path
    recorded = (read_manifest(store_path, required=False) or {}).get("model")
    return recorded if recorded == full else os.path.relpath(full, root)
