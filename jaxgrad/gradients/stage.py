"""Step 2 as a pipeline stage: the projected per-sample gradients of θ* for every train split and
the target's validation split, each in a resumable store under ``<workdir>/gradients/``, and the
projector a run's config defines (every later stage that lifts or compares in the projected space
builds the same one)."""

from __future__ import annotations

import os

import jax

from jaxgrad import rundir
from jaxgrad.common.checks import section_dict
from jaxgrad.common.distributed import barrier
from jaxgrad.common.sharding import local_data_mesh
from jaxgrad.data.sources import load_data
from jaxgrad.gradients.compute import compute_gradient_store, store_model_id
from jaxgrad.gradients.per_sample import num_trainable
from jaxgrad.gradients.projection import Projector
from jaxgrad.gradients.store import GradientStore
from jaxgrad.train.stage import load_theta_star


def projector_from_config(config, dim: int) -> Projector:
    """The run's projector ``P`` (``gradients.projection_{seed,dim,kind}``) for ``dim`` trainable
    parameters: the same matrix every stage of the run uses (P is never stored).

    Args:
      config: the run config (reads ``config.gradients``).
      dim: D, the number of trainable parameters (:func:`num_trainable`).

    Returns:
      A :class:`Projector` (D×k, ``projection_dim`` = k).

    Raises:
      ValueError / TypeError: ``dim``, k or the seed out of range, or an unknown kind
        (``Projector.__post_init__``).
    """
    g = config.gradients
    return Projector(seed=int(g.projection_seed), dim=dim, k=int(g.projection_dim), kind=str(g.projection_kind))


def stage_gradients(config, workdir: str) -> dict:
    """Step 2: projected per-sample gradients of all train splits and the target's validation."""

    g = section_dict(config, "gradients")
    data = load_data(config.data)
    if not data.target:
        raise ValueError("config.data: the pipeline needs a target source (data.synthetic.target "
                         "or data.files.target)")
    paths = {name: rundir.gradients_dir(workdir, name) for name in ("train", "target")}
    if all(_store_complete(p) for p in paths.values()):
        return {k: GradientStore.open(p).num_examples for k, p in paths.items()}
    model, tokenizer = load_theta_star(config, workdir)
    full = bool(config.train.full_finetune)  # what meta-training trained
    dim = num_trainable(model, full)
    if int(g["projection_dim"]) > dim:  # θ* is kept: only this stage's settings must change
        raise ValueError(f"config.gradients.projection_dim = k = {int(g['projection_dim'])} is "
                         f"more than the D = {dim} trainable parameters of θ*: a projection "
                         f"cannot add information; set k <= {dim}")
    projector = projector_from_config(config, dim)
    # Each process computes its own rows (process_index / process_count) on its own devices:
    # every chunk of samples sharded over them (jaxgrad.gradients.per_sample).
    kw = dict(mesh=local_data_mesh(), full_finetune=full, sources=data.sources,
              output_fn=g["output_fn"], eps=float(g["eps"]),
              batch_size=int(g["batch_size"]), chunk_size=int(g["chunk_size"]),
              max_length=int(config.train.max_length), shard_size=int(g["shard_size"]),
              dtype=g["dtype"], progress=bool(config.train.progress),
              process_index=jax.process_index(), process_count=jax.process_count())
    counts = {}
    for name, split, sources in (("train", "train", None), ("target", "validation", [data.target])):
        examples = data.examples(split, sources)
        model_id = store_model_id(config.model.name_or_path or "scratch", workdir, paths[name])
        store = compute_gradient_store(model, examples, tokenizer, projector, paths[name],
                                       split=split, model_id=model_id, **kw)
        if jax.process_count() > 1:
            barrier(f"gradients/{name}")
            if jax.process_index() == 0:
                store = GradientStore.merge(paths[name])
        counts[name] = store.num_examples
    return counts


def _store_complete(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, rundir.MANIFEST_FILE)):
        return False
    try:
        return GradientStore.open(path).complete
    except ValueError:
        return False
