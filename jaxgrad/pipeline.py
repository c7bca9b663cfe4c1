"""The GradEx method end to end, one resumable stage at a time.

    base ─► meta_train ─► gradients ─► (groups) ─► estimates ─► selection ─► finetune ─► (fidelity) ─► report

Each stage reads the previous stages' artefacts from the run directory and writes its own; a
stage whose artefact exists is skipped, so a run that was interrupted continues where it stopped
and any stage can be rerun alone by deleting its folder.

Artefacts are reused only under the config they were computed with: each stage has a fingerprint
of the config keys it reads and of the fingerprints of the stages it reads
(:mod:`jaxgrad.fingerprint`), recorded in ``<workdir>/stages.json``. A changed fingerprint raises
:class:`ConfigChangedError` (the stage, the run directory, the changed keys) and deletes nothing,
unless ``pipeline.on_config_change = "rerun"`` (``--on_config_change=rerun``): then the changed
stage's artefacts and everything downstream are deleted and recomputed. Layout (see
checkpoints/README.md):

    <workdir>/base/                  tiny base pretrained from scratch (only if config.base.pretrain)
    <workdir>/meta_train/            θ*: LoRA meta-training on all sources (jaxgrad.train.stage)
    <workdir>/gradients/{train,target}/  projected per-sample gradients (jaxgrad.gradients.store)
    <workdir>/groups/groups.json     with groups.by = "cluster": the units selected among, clusters
                                     of samples by their projected gradients (jaxgrad.groups)
    <workdir>/estimates/estimates.csv    one row per sampled subset: sources, estimates, solver status
    <workdir>/selection/selection.json   ensemble scores, intervals, the chosen sources, baselines
    <workdir>/finetune/<name>/       the base model fine-tuned on: selection, all, random, grad_sim,
                                     repr_sim
    <workdir>/fidelity/              with pipeline.fidelity: θ* really fine-tuned on K subsets vs the
                                     estimates (jaxgrad.fidelity; fidelity.json)
    <workdir>/report.md, *.png       what ran, the selection and the target metrics side by side
    <workdir>/stages.json            per stage: config fingerprint, the values behind it, complete

Library functions receive the ml_collections config (the stage boundary) and turn its sections
into typed values before calling the jitted core.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from jaxgrad._compat import moved_names
from jaxgrad import rundir
from jaxgrad.common import counts
from jaxgrad.common.checks import as_names
from jaxgrad.common.counts import check_fraction_or_count, fraction_or_count
from jaxgrad.common.distributed import barrier, initialize_distributed
from jaxgrad.common.flat import tree_norm
from jaxgrad.common.jsonio import read_json, write_json, write_shared_json
from jaxgrad.common.progress import progress_bar
from jaxgrad.common.sharding import make_mesh
from jaxgrad.config import (CHOICES, FINETUNE_RUNS, SELECTION_METRICS, MeshConfig, ModelSpec,
                            TrainConfig, default_config)
from jaxgrad.data.sources import load_data
from jaxgrad.estimate.lift import estimate_subsets, exact_estimates, rescale_factors
from jaxgrad.estimate.subsets import masks_from_sources, sample_subsets, subset_size
from jaxgrad.estimate.surrogate import fit_subsets
from jaxgrad.fingerprint import (STAGE_ORDER, ConfigChangedError, model_input_digests,
                                 stage_fingerprints)
from jaxgrad.gradients.compute import compute_gradient_store, store_model_id
from jaxgrad.gradients.outputs import get_output_fn, outputs_loss
from jaxgrad.gradients.per_sample import num_trainable, trainable_filter
from jaxgrad.gradients.projection import Projector
from jaxgrad.gradients.store import GradientStore
from jaxgrad.groups.units import GroupsSpec, Units, make_groups
from jaxgrad.models.hf_config import resolve_dtype
from jaxgrad.models.forward import model_logits
from jaxgrad.records import (REGENERATED, artefacts_exist, delete_artefacts, downstream,
                             make_record, read_records, reconcile, write_records)
from jaxgrad.rundir import resolved_config
from jaxgrad.select.baselines import (baseline_all, baseline_random, baseline_random_total,
                                      gradient_similarity_scores)
from jaxgrad.select.scores import ensemble_scores, select_threshold, select_top
from jaxgrad.select.stepwise import forward_selection, ordered_selection
from jaxgrad.train.final_finetune import finetune
from jaxgrad.train.stage import (load_theta_star, stage_base, stage_meta_train,
                                  stopped_early)

log = logging.getLogger("jaxgrad.pipeline")

STAGES = ("base", "meta_train", "gradients", "groups", "estimates", "selection", "finetune",
          "fidelity", "report")
assert STAGES == STAGE_ORDER  # jaxgrad.fingerprint declares each stage's inputs and config keys
BAD_KINDS = ("noisy", "unrelated")


# ------------------------------------------------------------------------------------------------
# helpers


def _section(config, name):
    sec = getattr(config, name)
    return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec)


# ------------------------------------------------------------------------------------------------
# stages


def _projector(config, dim: int):
    g = config.gradients
    return Projector(seed=int(g.projection_seed), dim=dim, k=int(g.projection_dim), kind=str(g.projection_kind))


def stage_gradients(config, workdir: str) -> dict:
    """Step 2: projected per-sample gradients of all train splits and the target's validation."""

    g = _section(config, "gradients")
    data = load_data(config.data)
    if not data.target:
        raise ValueError("config.data: the pipeline needs a target source (data.synthetic.target "
                         "or data.files.target)")
    paths = {name: rundir.gradients_dir(workdir, name) for name in ("train", "target")}
    if all(_store_complete(p) for p in paths.values()):
        return {k: GradientStore.open(p).num_examples for k, p in paths.items()}
    model, tokenizer = load_theta_star(config, workdir)
    dim = num_trainable(model)
    if int(g["projection_dim"]) > dim:  # θ* is kept: only this stage's settings must change
        raise ValueError(f"config.gradients.projection_dim = k = {int(g['projection_dim'])} is "
                         f"more than the D = {dim} trainable parameters of θ*: a projection "
                         f"cannot add information; set k <= {dim}")
    projector = _projector(config, dim)
    # Each process computes its own rows (process_index / process_count) on its own devices:
    # every chunk of samples sharded over them (jaxgrad.gradients.per_sample).
    kw = dict(mesh=local_data_mesh(), sources=data.sources, output_fn=g["output_fn"], eps=float(g["eps"]),
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


def local_data_mesh():
    """A ``data`` mesh over this process's devices (None with one): per-sample work shards its
    samples over them. Per-sample gradients are independent, so this changes no result beyond
    float32 rounding (a device's matmuls cover fewer samples and may sum in another order)."""
    devices = jax.local_devices()
    return make_mesh(len(devices), 1, devices=devices) if len(devices) > 1 else None


def global_data_mesh():
    """A ``data`` mesh over every device of every process (None with one device): the surrogate
    fits shard their subsets over it (``jaxgrad.estimate.surrogate.fit_subsets``)."""
    return make_mesh(-1, 1) if jax.device_count() > 1 else None


def _store_complete(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, rundir.MANIFEST_FILE)):
        return False
    try:
        return GradientStore.open(path).complete
    except ValueError:
        return False


def groups_enabled(config) -> bool:
    """Whether the optional groups stage runs (``groups.by = "cluster"``)."""
    return GroupsSpec.from_config(config.get("groups")).clustered


def stage_groups(config, workdir: str) -> dict | None:
    """Optional (``groups.by = "cluster"``): clusters of train samples by their projected gradients,
    the units every later stage selects among (:mod:`jaxgrad.groups`); ``groups/groups.json``."""

    spec = GroupsSpec.from_config(config.get("groups"))
    if not spec.clustered:
        return None
    out = os.path.join(workdir, rundir.GROUPS_FILE)
    if not os.path.isfile(out):
        train = GradientStore.open(rundir.gradients_dir(workdir, "train"))
        t0 = time.time()
        data = load_data(config.data)
        record = make_groups(spec, train.feats(), train.example_ids, train.source_ids,
                             data.sources)
        record["seconds"] = round(time.time() - t0, 3)
        prompts = {e["example_id"]: e["prompt"] for e in data.examples("train")}
        for u in record["units"]:  # for the report: what a unit holds, at a glance
            u["example_prompts"] = [prompts[e][:300] for e in u["example_ids"][:3]]
        os.makedirs(os.path.dirname(out), exist_ok=True)
        write_shared_json(out, record, "groups")  # every process computed the same record
    record = read_json(out)
    return {"units": len(record["units"]), "sizes": [u["size"] for u in record["units"]]}


def pipeline_units(config, workdir: str, sources: Sequence[str] | None = None):
    """The units the estimates, selection and fine-tunes choose among (:class:`jaxgrad.groups.Units`):
    the data's sources, or with ``groups.by = "cluster"`` the groups stage's record."""
    if GroupsSpec.from_config(config.get("groups")).clustered:
        path = os.path.join(workdir, rundir.GROUPS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"groups.by = 'cluster' but {path} does not exist: run the "
                                    "groups stage first (--stages=groups)")
        return Units.from_file(path)
    return Units.of_sources(list(dict.fromkeys(sources if sources is not None
                                               else _data_sources(config))))


ESTIMATE_FIELDS = ("subset", "sources", "n_samples", "converged", "n_iter", "loss", "accuracy",
                   "mean_output", "exact_loss")


def _theta_norm_and_state(model):
    state = nnx.state(model, trainable_filter(model))
    return float(tree_norm(state)), state


def stage_estimates(config, workdir: str) -> str:
    """Steps 3–4: surrogate fits for m random subsets and their estimated target metrics.

    Rows already in ``estimates.csv`` are not recomputed (run_pipeline has checked that they were
    computed under the same config).
    """
    s = _section(config, "surrogate")
    os.makedirs(os.path.join(workdir, rundir.ESTIMATES_DIR), exist_ok=True)
    table = os.path.join(workdir, rundir.ESTIMATES_FILE)
    sources = pipeline_units(config, workdir).names
    size = subset_size(len(sources), s["subset_size"], name="config.surrogate.subset_size")
    subsets = sample_subsets(len(sources), int(s["num_subsets"]), size, int(s["seed"]))
    # Rows are reused only under the same config: run_pipeline checks the stage's fingerprint
    # (jaxgrad.fingerprint; it replaced estimates/settings.json, still read in old run directories).
    done_rows = _read_estimates(table) if os.path.isfile(table) else []
    todo = [i for i in range(len(subsets)) if i >= len(done_rows)]
    if not todo:
        return table
    score = SurrogateScorer(config, workdir, sources)
    chunk = int(s["chunk_subsets"])
    new_file = not done_rows
    # Every process fits every chunk (the subsets are sharded over all devices of all
    # processes); process 0 writes the table, the others wait for it at the end.
    writes = jax.process_index() == 0
    with open(table if writes else os.devnull, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=ESTIMATE_FIELDS)
        if new_file:
            writer.writeheader()
        starts = range(todo[0], len(subsets), chunk)
        bar = (progress_bar(total=len(subsets), initial=todo[0], desc="estimates",
                            unit="subset", disable=not config.train.get("progress", True)
                            or jax.process_index() != 0))
        for c0 in starts:
            rows = subsets[c0 : c0 + chunk]
            out = score(rows)
            bar.update(rows.shape[0])
            for r in range(rows.shape[0]):
                writer.writerow({
                    "subset": c0 + r,
                    "sources": json.dumps([sources[j] for j in np.flatnonzero(rows[r])]),
                    **{k: v[r] for k, v in out.items()},
                })
            fh.flush()
        bar.close()
    barrier("estimates")
    return table


class SurrogateScorer:
    """The surrogate's estimates for subsets of sources, as the estimates table records them.

    ``scorer(rows)`` fits the surrogate (``surrogate.*``) on the samples of each of the S×M
    boolean ``rows`` in one batched solve and returns, per row, the columns of ``estimates.csv``
    after ``subset`` and ``sources``: ``n_samples``, ``converged``, ``n_iter``, ``loss``,
    ``accuracy`` / ``mean_output`` (``logit_odds``; else ""), ``exact_loss`` (``surrogate.mode =
    "exact"``; else ""), each a length-S sequence. The estimates stage writes them; the
    stepwise selectors (``selection.method``) call it round by round.
    """
    def __init__(self, config, workdir: str, sources: Sequence[str]):
        s = _section(config, "surrogate")
        self.s = s
        self.sources = list(sources)
        train = GradientStore.open(rundir.gradients_dir(workdir, "train"))
        target = GradientStore.open(rundir.gradients_dir(workdir, "target"))
        self.output_fn = str(config.gradients.output_fn)
        feats = train.feats()
        if self.output_fn == "token_ce":  # fit on -∇CE so that Δ lowers the loss
            feats = -feats
        self.feats = feats
        self.offsets = train.f() if s["objective"] == "taylor" else None
        units = pipeline_units(config, workdir, self.sources)
        if units.names != self.sources:
            raise ValueError(f"SurrogateScorer: sources {self.sources} are not the run's units "
                             f"{units.names}")
        self.ids = units.row_ids(train.example_ids, train.source_ids)
        model, _ = load_theta_star(config, workdir)
        self.theta_norm, theta = _theta_norm_and_state(model)
        self.projector = _projector(config, sum(int(np.prod(x.shape))
                                                for x in jax.tree_util.tree_leaves(theta)))
        self.gram = self.projector.gram()
        self.t_feats, self.t_f = target.feats(), target.f()
        self.exact_fn = _exact_loss_fn(config, workdir, model) if s["mode"] == "exact" else None
        self.mesh = global_data_mesh()

    def __call__(self, rows) -> dict[str, Sequence]:
        s = self.s
        rows = np.asarray(rows, bool)
        empty = ~rows.any(axis=1)
        if empty.any():  # no sources: Δ = 0, the estimate at θ* (the stepwise selectors' start)
            out = self(rows[~empty]) if (~empty).any() else None
            base = self._at_theta_star()
            merged, j = {k: [] for k in base}, 0
            for is_empty in empty:
                for k in merged:
                    merged[k].append(base[k] if is_empty else out[k][j])
                j += not is_empty
            return merged
        n = rows.shape[0]
        masks = masks_from_sources(self.ids, rows, n_sources=len(self.sources))
        fits = fit_subsets(self.feats, masks, objective=s["objective"], C=float(s["C"]),
                           seed=int(s["seed"]), offsets=self.offsets, mesh=self.mesh)
        scale = None if float(s["scale"]) <= 0 else float(s["scale"])
        c = rescale_factors(fits.coef, self.gram, self.theta_norm, scale=scale)
        est = estimate_subsets(fits.coef, c, self.t_feats, self.t_f, output=self.output_fn)
        exact = self.exact_fn(fits.coef, c, self.projector) if self.exact_fn else None
        blank = [""] * n
        return {
            "n_samples": [int(x) for x in np.asarray(masks).sum(axis=1)],
            "converged": [bool(x) for x in np.asarray(fits.converged)],
            "n_iter": [int(x) for x in np.asarray(fits.n_iter)],
            "loss": [float(x) for x in np.asarray(est["loss"])],
            "accuracy": [float(x) for x in np.asarray(est["accuracy"])] if "accuracy" in est else blank,
            "mean_output": ([float(x) for x in np.asarray(est["mean_output"])]
                            if "mean_output" in est else blank),
            "exact_loss": [float(x) for x in np.asarray(exact)] if exact is not None else blank,
        }

    def _at_theta_star(self) -> dict:
        """The columns for the empty subset: no samples, no update, the metrics at θ*."""
        zero = np.zeros((1, self.t_feats.shape[1]), np.float32)
        est = estimate_subsets(zero, np.zeros((1,), np.float32), self.t_feats, self.t_f,
                               output=self.output_fn)
        exact = (self.exact_fn(zero, np.zeros((1,), np.float32), self.projector)
                 if self.exact_fn else None)
        return {"n_samples": 0, "converged": True, "n_iter": 0,
                "loss": float(np.asarray(est["loss"])[0]),
                "accuracy": float(np.asarray(est["accuracy"])[0]) if "accuracy" in est else "",
                "mean_output": (float(np.asarray(est["mean_output"])[0])
                                if "mean_output" in est else ""),
                "exact_loss": float(np.asarray(exact)[0]) if exact is not None else ""}


def _exact_loss_fn(config, workdir, model):
    """exact mode: the target validation loss of θ* + Δ_S by a forward pass per subset.

    The loss is the one the linearized estimate predicts (``outputs.outputs_loss`` of the config's
    output function), so the table's ``loss`` and ``exact_loss`` columns compare.
    """
    from jaxgrad.data.batching import collate, encode_for_model

    data = load_data(config.data)
    examples = data.target_examples()
    _, tokenizer = load_theta_star(config, workdir)
    enc, arch = encode_for_model(examples, tokenizer, model, sources=data.sources)
    batch = collate(enc, list(range(len(examples))), max_length=int(config.train.max_length), arch=arch)
    batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    graphdef, theta, rest = nnx.split(model, trainable_filter(model), ...)

    output = str(config.gradients.output_fn)
    out_fn = get_output_fn(output, float(config.gradients.eps))

    def loss_fn(params):
        logits = model_logits(nnx.merge(graphdef, params, rest), batch)
        return outputs_loss(out_fn(logits, batch["targets"], batch["target_mask"]), output)

    mesh = global_data_mesh()

    def run(coef, c, projector):
        return np.asarray(exact_estimates(loss_fn, theta, coef, c, projector, mesh=mesh,
                                          chunk_size=int(config.surrogate.exact_chunk)))
    return run


def _read_estimates(path: str) -> list[dict]:
    """Rows of ``estimates.csv`` as written, plus ``source_list`` (see :func:`subset_sources`)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["source_list"] = subset_sources(r["sources"])
    return rows


def subset_sources(value: str | Sequence[str]) -> list[str]:
    """The source names of a subset as ``estimates.csv`` and ``fidelity.json`` record them.

    Names are arbitrary strings (``c++``, ``a,b``, ``q&a/v2``), so a subset is stored as a JSON
    list, never as names joined by a separator. A list is returned as is; a string is parsed as
    a JSON list, or, when it is not one, split on ``+`` (run directories written before JSON).

    Raises:
      ValueError: a JSON value that is not a list of strings.
    """
    if not isinstance(value, str):
        return [str(s) for s in value]
    if value.startswith("["):
        names = json.loads(value)
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise ValueError(f"estimates: a subset's sources must be a JSON list of names, got "
                             f"{value!r}")
        return names
    return value.split("+") if value else []


def _data_sources(config) -> list[str]:
    return load_data(config.data).sources


def selection_metric(config) -> str:
    """The estimates column that scores sources: ``selection.metric``, where ``"loss"`` means the
    forward-pass ``exact_loss`` when ``surrogate.mode = "exact"`` (that is what exact mode is for).
    """
    metric = str(_section(config, "selection")["metric"])
    if metric not in SELECTION_METRICS:
        raise ValueError(f"config.selection.metric must be one of {SELECTION_METRICS}, got {metric!r}")
    if metric == "loss" and str(_section(config, "surrogate")["mode"]) == "exact":
        return "exact_loss"
    return metric


def stage_selection(config, workdir: str) -> dict:
    """Step 5: random-ensemble scores with bootstrap intervals; the chosen sources; baselines."""

    out = os.path.join(workdir, rundir.SELECTION_FILE)
    if os.path.isfile(out):
        result = read_json(out)
        if "repr_sim" not in result["baselines"]:  # made before the repr_sim baseline existed
            data = load_data(config.data)
            rep = representation_similarity(config, workdir, data,
                                            pipeline_units(config, workdir, data.sources))
            k, sources = len(result["selected"]), result["sources"]
            result["repr_sim_scores"] = rep
            result["baselines"]["repr_sim"] = [sources[i] for i in sorted(np.argsort(-rep)[:k])]
            result = write_shared_json(out, result, "selection/repr_sim")
        return result
    sel = _section(config, "selection")
    data = load_data(config.data)
    units = pipeline_units(config, workdir, data.sources)
    sources = units.names
    rows = _read_estimates(os.path.join(workdir, rundir.ESTIMATES_FILE))
    metric = selection_metric(config)
    if rows and any(r.get(metric, "") == "" for r in rows):
        raise ValueError(f"config.selection.metric = {sel['metric']!r}: the estimates table "
                         f"{workdir}/estimates/estimates.csv has no {metric!r} values (accuracy and "
                         "mean_output need gradients.output_fn = 'logit_odds'; exact_loss needs "
                         "surrogate.mode = 'exact')")
    est = np.array([float(r[metric]) for r in rows])
    higher_is_better = metric in ("accuracy", "mean_output")
    subsets = np.array([[s in r["source_list"] for s in sources] for r in rows])
    ens = ensemble_scores(subsets, est if higher_is_better else -est, n_boot=int(sel["n_boot"]),
                          seed=int(sel["seed"]))
    scores = np.asarray(ens.scores)
    method = str(sel.get("method", "ensemble"))
    top = subset_size(int(np.sum(~np.isnan(scores))), sel["top"], name="config.selection.top")
    stepwise = None
    if method == "ensemble":
        picked = select_top(scores, top)
    elif method == "threshold":
        picked = select_threshold(scores, float(sel["threshold"]))
    else:
        picked, stepwise = _stepwise_selection(config, workdir, sources, scores, metric, top)
    if len(picked) == 0:
        raise ValueError(f"config.selection.method = {method!r} selected no source ("
                         + ("no ensemble score reaches selection.threshold = "
                            f"{float(sel['threshold'])}; the scores range from "
                            f"{np.nanmin(scores):.6g} to {np.nanmax(scores):.6g}, higher is "
                            "better" + ("" if higher_is_better else
                                        f": the negated estimated {metric}")
                            if method == "threshold" else
                            "no source improves the estimated target metric at θ* by more than "
                            f"selection.min_gain = {float(sel['min_gain'])}") + "); the estimates "
                         f"in {workdir}/estimates are kept")
    chosen = [sources[i] for i in sorted(int(i) for i in picked)]
    train = GradientStore.open(rundir.gradients_dir(workdir, "train"))
    target = GradientStore.open(rundir.gradients_dir(workdir, "target"))
    ids = units.row_ids(train.example_ids, train.source_ids)
    sim = np.asarray(gradient_similarity_scores(train.feats(), ids, target.feats(), n_sources=len(sources)))
    rep = representation_similarity(config, workdir, data, units)
    k = len(chosen)
    names = lambda idx: [sources[i] for i in sorted(int(i) for i in idx)]  # noqa: E731
    sizes = units.sizes()
    if sizes is None:  # whole sources: the same number of sources as the selection
        random_pick = baseline_random(len(sources), k, seed=int(sel["seed"]))
    else:  # clusters of unequal sizes: random units of the selection's number of samples
        random_pick = baseline_random_total([sizes[u] for u in sources],
                                            sum(sizes[u] for u in chosen), seed=int(sel["seed"]))
    baselines = {  # the same number of sources as the selection (all: every one)
        "all": names(baseline_all(len(sources))),
        "random": names(random_pick),
        "grad_sim": names(select_top(sim, k)),
        "repr_sim": names(select_top(rep, k)),
    }
    ranking = [sources[i] for i in np.argsort(-scores)]
    kinds = units.kinds(dict(data.kinds or {}))
    result = {
        "method": method, "stepwise": stepwise,
        "metric": metric, "higher_is_better": higher_is_better, "target": data.target,
        "sources": sources,
        "scores": scores, "ci_low": np.asarray(ens.ci_low), "ci_high": np.asarray(ens.ci_high),
        "counts": np.asarray(ens.counts), "ranking": ranking, "selected": chosen,
        "grad_sim_scores": sim, "repr_sim_scores": rep, "baselines": baselines, "kinds": kinds,
        "ranking_auc": ranking_auc(ranking, kinds),
    }
    if sizes is not None:
        result["groups"] = {"by": "cluster", "sizes": [sizes[u] for u in sources]}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return write_shared_json(out, result, "selection")


def _stepwise_selection(config, workdir, sources, scores, metric, top):
    """``selection.method`` "forward" (greedy forward stepwise selection, at most
    ``selection.top`` sources) or "ordered" (the paper's single pass in ensemble-score order),
    each step scoring its candidate subsets with the surrogate in one batched call
    (:class:`SurrogateScorer`). Returns the chosen indices and a record of the search."""
    sel = _section(config, "selection")
    method = str(sel["method"])
    scorer = SurrogateScorer(config, workdir, sources)
    sign = 1.0 if metric in ("accuracy", "mean_output") else -1.0

    def score_fn(rows):
        return sign * np.asarray(scorer(rows)[metric], np.float64)

    t0 = time.time()
    min_gain = float(sel["min_gain"])
    if method == "forward":
        res = forward_selection(score_fn, len(sources), max_size=top, min_gain=min_gain)
    else:
        res = ordered_selection(scores, score_fn, min_gain=min_gain)
    record = {"order": [sources[i] for i in res.selected], "path_scores": list(res.path_scores),
              "initial_score": res.initial_score, "n_calls": res.n_calls,
              "n_evaluated": res.n_evaluated, "seconds": round(time.time() - t0, 3)}
    return np.asarray(res.selected, int), record


def representation_similarity(config, workdir: str, data, units=None) -> np.ndarray:
    """The representation-similarity baseline's scores: per unit (source, or group of
    ``units``), the cosine between its train examples' mean last-layer hidden state at θ* and
    the target validation examples' (the examples the target gradients are taken on);
    :mod:`jaxgrad.representations`."""
    from jaxgrad.representations import mean_representations

    units = units or Units.of_sources(data.sources)
    model, tokenizer = load_theta_star(config, workdir)
    kw = dict(sources=data.sources, max_length=int(config.train.max_length),
              batch_size=int(_section(config, "gradients")["batch_size"]))
    train = data.examples("train")
    reps = mean_representations(model, tokenizer, train, **kw)
    target = mean_representations(model, tokenizer, data.target_examples(), **kw)
    ids = units.row_ids([e["example_id"] for e in train], [e["source"] for e in train])
    return np.asarray(gradient_similarity_scores(reps, ids, target, n_sources=len(units.names)))


def ranking_auc(ranking: Sequence[str], kinds: dict) -> float | None:
    """P(a random good source ranks above a random bad one) (1 = every bad source at the bottom).

    Good = target/related, bad = noisy/unrelated; None when kinds are unknown or one side is empty.
    """
    good = [i for i, s in enumerate(ranking) if kinds.get(s) in ("target", "related")]
    bad = [i for i, s in enumerate(ranking) if kinds.get(s) in BAD_KINDS]
    if not good or not bad:
        return None
    return float(np.mean([[g < b for b in bad] for g in good]))


def stage_finetune(config, workdir: str) -> dict:
    """Final step: fine-tune the base model on the selection and on each baseline; test metrics."""
    selection = read_json(os.path.join(workdir, rundir.SELECTION_FILE))
    runs = {"selection": selection["selected"], **selection["baselines"]}
    units = pipeline_units(config, workdir)
    wanted = list(as_names(config.pipeline.finetune_runs) or ())
    results = {}
    trained: dict[str, str] = {}  # units (JSON) -> the run that trained on exactly them
    for name in wanted:
        run_dir = rundir.finetune_dir(workdir, name)
        done = os.path.join(run_dir, rundir.SOURCES_FILE)
        key = json.dumps(sorted(str(u) for u in runs[name]))
        twin = trained.get(key)
        # Decided once per process before anything is written (process 0 writes `done`).
        exists = os.path.isfile(done)
        if not exists and twin is not None:
            # The same units under the same settings and seed: the same fine-tune (training is
            # deterministic), recorded once more instead of trained twice.
            barrier(f"finetune/{name}/looked")  # every process has looked before process 0 writes
            if jax.process_index() == 0:
                os.makedirs(run_dir, exist_ok=True)
            twin_done = os.path.join(rundir.finetune_dir(workdir, twin), rundir.SOURCES_FILE)
            write_shared_json(done, {**read_json(twin_done), "same_as": twin},
                              f"finetune/{name}/same_as")
        elif not exists:
            cfg = copy.deepcopy(config)
            cfg.finetune.sources = json.dumps(list(runs[name]))  # names may hold commas
            cfg.finetune.selection_file = ""
            cfg.finetune.name = name
            # Units that are clusters of samples: finetune() reads their sample ids.
            cfg.finetune.groups_file = (os.path.join(workdir, rundir.GROUPS_FILE)
                                        if units.members is not None else "")
            steps = int(config.pipeline.get("finetune_steps", 0))
            if steps > 0:  # the same optimisation budget for every choice of sources
                cfg.train.num_steps = steps
            seed = int(config.pipeline.get("finetune_seed", -1))
            if seed >= 0:  # data order, dropout and the fresh adapters' initialisation
                cfg.train.seed = seed
                cfg.lora.seed = seed
            result = finetune(cfg, workdir)
            if stopped_early(cfg, result.step,
                              lambda data: units.examples(data, "train", runs[name])):
                if jax.process_index() == 0 and os.path.isfile(done):
                    os.remove(done)  # not done: the next run resumes this fine-tune
                return {**results, name: {"step": result.step}, "stopped_early": True}
        results[name] = read_json(done)
        trained.setdefault(key, results[name].get("same_as", name))
    return results


def _finetune_runs_done(config, workdir: str) -> bool:
    """Every run of ``pipeline.finetune_runs`` has finished (one added later has not)."""
    return all(os.path.isfile(os.path.join(rundir.finetune_dir(workdir, name), rundir.SOURCES_FILE))
               for name in as_names(config.pipeline.finetune_runs) or ())


def fidelity_enabled(config) -> bool:
    """Whether the optional fidelity stage runs (``pipeline.fidelity``)."""
    return bool((config.get("pipeline") or {}).get("fidelity", False))


def stage_fidelity(config, workdir: str) -> dict | None:
    """Optional (``pipeline.fidelity = True``): fine-tune θ* for real on ``fidelity.num_subsets``
    subsets of the estimates table and compare with the estimates (:mod:`jaxgrad.fidelity`)."""
    if not fidelity_enabled(config):
        return None
    from jaxgrad.fidelity import run_fidelity

    out = os.path.join(workdir, rundir.FIDELITY_FILE)
    if os.path.isfile(out):
        return read_json(out)
    result = run_fidelity(config, workdir)
    barrier("fidelity")  # process 0 wrote fidelity.json; the report reads it
    return {k: v for k, v in result.items() if k != "rows"}


def stage_report(config, workdir: str) -> str:
    """``report.md`` and plots from the artefacts of the earlier stages (nothing recomputed)."""
    from jaxgrad.report import write_report

    if jax.process_index() != 0:  # one process writes the report
        return os.path.join(workdir, rundir.REPORT_FILE)
    return write_report(config, workdir)


FRACTION_OR_COUNT = counts.SETTINGS  # setting -> (what it counts, whether 0 is allowed)


def validate_config(config, stages: Sequence[str] | None = None):
    """Checks, before the first stage, what would otherwise fail only after hours of training.

    * ``model.dtype`` / ``model.param_dtype`` (float32 or bfloat16);
    * ``train.full_finetune`` only without adapters (``lora.rank = 0``);
    * every "fraction or count" setting (:data:`FRACTION_OR_COUNT`) under the one rule of
      :mod:`jaxgrad.common.counts`, whether it came from Python, a config file or the command line;
    * the data load: every source's splits and the target's validation/test split non-empty
      (``jaxgrad.data.load_sources`` names the source, the split and the setting to change);
    * the counts of sources asked for (``surrogate.subset_size``, ``selection.top``) not more
      than the data have.

    Returns:
      The loaded ``MultiSourceData``, or None when the stages to run need no data.

    Raises:
      TypeError / ValueError: naming the setting (``config.selection.top``) and what it expects.
    """

    def get(path):
        node = config
        for part in path.split("."):
            if node is None or not hasattr(node, "get"):
                return None
            node = node.get(part)
        return node

    for key in ("model.dtype", "model.param_dtype"):
        if get(key) not in (None, ""):
            resolve_dtype(get(key), f"config.{key}")
    check_method_sections(config)
    if get("train.full_finetune") and int(get("lora.rank") or 0) > 0:
        # Meta-training would train every parameter, the later stages differentiate w.r.t. the
        # adapters whenever there are some: θ* and its gradients would differ in parameters.
        raise ValueError(f"config.train.full_finetune=True with config.lora.rank="
                         f"{get('lora.rank')}: the pipeline's gradients are taken w.r.t. the "
                         "parameters meta-training trains; set lora.rank=0 to meta-train and "
                         "score every parameter, or full_finetune=False for the adapters")
    data_kind = get("data.kind")
    for key, (_, allow_zero) in FRACTION_OR_COUNT.items():
        value = get(key)
        if value is None or (key.startswith("data.files.") and data_kind != "files"):
            continue
        check_fraction_or_count(value, name=f"config.{key}", allow_zero=allow_zero)
    stages = list(stages or STAGES)
    if get("data") is None or not (set(DATA_STAGES) & set(stages)):
        return None
    data = load_data(config.data)
    if not data.target and {"gradients", "estimates"} & set(stages):
        field = "data.synthetic.target" if data_kind == "synthetic" else "data.files.target"
        raise ValueError(f"config.{field} is not set: the pipeline scores sources by the loss on "
                         f"a target's validation split; name one of {list(data.sources)}")
    spec = GroupsSpec.from_config(get("groups"))
    spec.check({s: data.n("train", s) for s in data.sources})
    n_units = len(data.sources)
    if spec.clustered:
        n_units += spec.num_clusters - len(spec.clustered_sources(data.sources))
    for key in ("surrogate.subset_size", "selection.top"):
        if get(key) is not None:
            fraction_or_count(get(key), n_units, name=f"config.{key}", at_least_one=True)
    return data


def known_config_keys() -> dict[str, set[str]]:
    """``{section: its keys}`` for every section of a pipeline config: the method sections of
    :mod:`jaxgrad.config`, and the fields of the dataclass each other section fills
    (``TrainConfig``, ``LoraConfig``, ``ModelSpec``, ``MeshConfig``, ``SourcesSpec`` for
    ``data.files``, ``SyntheticSpec`` for ``data.synthetic``). ``""``: the top-level sections."""
    from jaxgrad.data import SourcesSpec, SyntheticSpec
    from jaxgrad.models import LoraConfig

    defaults = default_config()
    known = {name: set(defaults[name].keys()) for name in defaults.keys()}
    known[""] = set(defaults.keys())

    def fields(cls, exclude=()):
        return {f.name for f in dataclasses.fields(cls) if f.name not in exclude}

    known["train"] |= fields(TrainConfig, ("mesh",))
    known["lora"] |= fields(LoraConfig)
    known["model"] |= fields(ModelSpec)
    known["mesh"] |= fields(MeshConfig)
    known["data.files"] = fields(SourcesSpec)
    known["data.synthetic"] = fields(SyntheticSpec)
    return known


def check_method_sections(config) -> None:
    """Every section of the config holds only known keys (:func:`known_config_keys`: a misspelt
    key would be ignored and its default used, or found only when its stage starts, hours in),
    and the option keys one of their values (a value outside the set would silently take
    another branch).

    Raises:
      ValueError: naming every unknown key (with the closest known one) or the value and the
        values allowed.
    """
    problems = []
    for name, known in known_config_keys().items():
        section = config
        for part in name.split(".") if name else ():
            section = section.get(part) if hasattr(section, "get") else None
        if section is None or not hasattr(section, "keys"):
            continue
        where = f"config.{name}" if name else "config"
        for key in sorted(set(section.keys()) - known):
            near = difflib.get_close_matches(key, sorted(known), n=1)
            prefix = f"{name}." if name else ""
            problems.append(f"{where}.{key} is not a key of {where}"
                            + (f" (did you mean {prefix}{near[0]}?)" if near else "")
                            + f"; known: {sorted(known)}")
    for key, allowed in CHOICES.items():
        name, field = key.split(".")
        section = config.get(name) if hasattr(config, "get") else None
        if section is None or field not in section:
            continue
        if section[field] not in allowed:
            problems.append(f"config.{key} must be one of {tuple(allowed)}, got {section[field]!r}")
    pipe = config.get("pipeline") if hasattr(config, "get") else None
    if pipe is not None and "finetune_runs" in pipe:
        runs = as_names(pipe["finetune_runs"]) or ()
        bad = [r for r in runs if r not in FINETUNE_RUNS]
        if bad:
            problems.append(f"config.pipeline.finetune_runs: unknown runs {bad}; each one of "
                            f"{FINETUNE_RUNS}")
    if problems:
        raise ValueError("\n".join(problems))


DATA_STAGES = ("meta_train", "gradients", "groups", "estimates", "selection", "finetune", "fidelity")


def data_splits_record(data) -> dict:
    """What the run's artefacts assume of the data: a sha256 over the example ids of every
    split of every source (ids hash the prompt and completion, so it changes with any text, any
    split assignment, any source), and the split sizes, to show what changed."""
    splits = {split: {s: [e["example_id"] for e in data.examples(split, [s])] for s in data.sources}
              for split in ("train", "validation", "test")}
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode("utf-8")).hexdigest()
    sizes = {split: sum(len(v) for v in by_source.values()) for split, by_source in splits.items()}
    return {"digest": digest, "sizes": sizes}


def _stores_disagree(workdir: str, data) -> bool:
    """Whether a gradient store of ``workdir`` holds other example ids than ``data`` gives it
    (train: every train example; target: the target's validation split)."""
    for name, ids in (("train", data.examples("train")),
                      ("target", data.target_examples() if data.target else [])):
        manifest = os.path.join(rundir.gradients_dir(workdir, name), rundir.MANIFEST_FILE)
        if os.path.isfile(manifest):
            recorded = read_json(manifest).get("example_ids")
            if recorded is not None and recorded != [e["example_id"] for e in ids]:
                return True
    return False


def check_data_splits(workdir: str, data, mode: str) -> None:
    """Artefacts are reused only with the data they were computed on.

    The config fingerprints (:mod:`jaxgrad.fingerprint`) cannot see the data change when the same
    config loads other examples or other splits (an edited file; a jaxgrad version that reads
    text or splits duplicates differently). ``<workdir>/data_splits.json`` records the splits'
    digest; when it differs and data-dependent artefacts exist, ``mode`` "error" raises and
    "rerun" deletes them (meta_train and everything after it) so they are recomputed. A run
    directory without the file (from before it existed) adopts the current data, as it does for
    config records, unless its gradient stores name other examples than the data has.

    Raises:
      ConfigChangedError: the data changed and ``mode`` is "error" (nothing deleted).
    """
    path = os.path.join(workdir, rundir.SPLITS_FILE)
    new = data_splits_record(data)
    old = read_json(path) if os.path.isfile(path) else None
    if old is None and _stores_disagree(workdir, data):
        old = {"digest": "(from the gradient stores' example ids)", "sizes": "unrecorded"}
    if old is not None and old.get("digest") != new["digest"]:
        stale = [s for s in downstream("meta_train") if artefacts_exist(workdir, s)]
        if stale:
            change = ("data splits", old.get("sizes"), new["sizes"])
            if mode == "error":
                raise ConfigChangedError(
                    f"{workdir}: the data changed since its artefacts were computed (the same "
                    f"config now loads other examples or other splits; sizes {old.get('sizes')} "
                    f"→ {new['sizes']}). Stale: {', '.join(stale)}. Use a new --workdir, or "
                    f"--on_config_change=rerun to delete them and recompute from 'meta_train'.",
                    stage="meta_train", workdir=workdir, changes=[change])
            if jax.process_index() == 0:
                deleted = [p for s in stale for p in delete_artefacts(workdir, s)]
                records = read_records(workdir)
                write_records(workdir, {k: v for k, v in records.items() if k not in stale})
                log.warning("jaxgrad pipeline: the data changed since %s was computed; "
                            "on_config_change='rerun': deleted %s", workdir, ", ".join(deleted))
            barrier("pipeline/data_checked")
    if (old is None or old.get("digest") != new["digest"]) and jax.process_index() == 0:
        write_json(path, new)


def run_pipeline(config, workdir: str, stages: Sequence[str] | None = None,
                 on_config_change: str | None = None) -> dict:
    """Run the stages in order (all by default), skipping those whose artefacts exist.

    Artefacts are reused only if they were computed under the same config (their stage's
    fingerprint, see :mod:`jaxgrad.fingerprint`); the stages before those run are checked too.

    Args:
      config: the ml_collections config (as given: ``resolved_config`` is applied here).
      workdir: the run directory (created if missing).
      stages: stage names to run (default all, always in pipeline order).
      on_config_change: "error" (raise :class:`ConfigChangedError`, delete nothing) or "rerun"
        (delete the changed stage's artefacts and everything downstream, then recompute);
        default ``config.pipeline.on_config_change``, else "error".

    Returns:
      ``{stage: its result, "timings": {stage: seconds}}``; ``"stopped_early": stage`` when a
      training stage stopped at ``train.stop_after_steps`` (the stages after it did not run).
    """
    stages = list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown pipeline stages {unknown}; expected some of {list(STAGES)}")
    if on_config_change is None:
        pipeline_section = config.get("pipeline") or {}
        on_config_change = pipeline_section.get("on_config_change", "error") or "error"
    # Before anything touches JAX (reconcile asks for the process index): multi-host runs.
    initialize_distributed(bool((config.get("train") or {}).get("distributed", False)))
    data = validate_config(config, stages)
    os.makedirs(workdir, exist_ok=True)
    if data is not None:
        check_data_splits(workdir, data, str(on_config_change))
    inputs = model_input_digests(config, workdir)
    fingerprints = stage_fingerprints(config, inputs)
    skip = (() if fidelity_enabled(config) else ("fidelity",)) + (
        () if groups_enabled(config) else ("groups",))
    records = reconcile(workdir, fingerprints, stages, str(on_config_change), skip=skip,
                        config_only=stage_fingerprints(config) if inputs else None)
    timings = {}
    fns = {"base": stage_base, "meta_train": stage_meta_train, "gradients": stage_gradients,
           "groups": stage_groups, "estimates": stage_estimates, "selection": stage_selection, "finetune": stage_finetune,
           "fidelity": stage_fidelity, "report": stage_report}
    out = {}
    for name in STAGES:
        if name not in stages:
            continue
        if name in skip:  # an optional stage switched off: nothing runs, its record is kept
            out[name] = None
            continue
        fp = fingerprints[name]
        rec = records.get(name, {})
        reused = bool(name not in REGENERATED and rec.get("fingerprint") == fp.fingerprint
                      and rec.get("complete") and artefacts_exist(workdir, name)
                      and (name != "finetune" or _finetune_runs_done(config, workdir)))
        if rec.get("fingerprint") != fp.fingerprint or (
                rec.get("complete") and not artefacts_exist(workdir, name)):
            # Before the stage writes anything: a half-done stage resumes only under this config.
            records[name] = make_record(fp, complete=False)
            write_records(workdir, records)
        cfg = config if name == "base" else resolved_config(config, workdir)
        t0 = time.time()
        if not (name == "base" and not (config.get("base") or {}).get("pretrain", False)):
            # (no line for a base that is not built: a pretrained model is the base)
            print(f"[jaxgrad] stage {name} ..." + (" reused" if reused else ""), flush=True)
        out[name] = fns[name](cfg, workdir)
        timings[name] = time.time() - t0
        _append_timing(workdir, name, timings[name], reused or out[name] is None)
        if isinstance(out[name], dict) and out[name].get("stopped_early"):
            print(f"[jaxgrad] stage {name} stopped early (train.stop_after_steps) after "
                  f"{timings[name]:.1f}s; run again to resume", flush=True)
            out["stopped_early"] = name
            break
        if not reused and out[name] is not None:
            print(f"[jaxgrad] stage {name} done in {timings[name]:.1f}s", flush=True)
        if records[name].get("complete") is not True:
            records[name] = make_record(fp, complete=True, legacy=records[name].get("legacy", False))
            write_records(workdir, records)
    out["timings"] = timings
    barrier("pipeline/done")  # no process leaves (and shuts down) while another still writes
    return out


def _append_timing(workdir: str, stage: str, seconds: float, reused: bool = False) -> None:
    """One row per stage run; ``reused``: its artefacts existed under the same fingerprint, or it
    had nothing to do (a stage switched off): the report shows the seconds of computing runs."""
    if jax.process_index() != 0:
        return
    row = {"stage": stage, "seconds": round(seconds, 2), "time": time.time(), "reused": reused}
    with open(os.path.join(workdir, rundir.TIMINGS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")


def stage_script(stage: str | Sequence[str], overrides: dict[str, Any] | None = None) -> None:
    """Entry point of the thin per-stage scripts: ``--config`` and ``--workdir`` flags, one stage
    (or a few, in order: the result of the last is printed).

    ``overrides``: dotted config keys set before running (e.g. the switch of an optional stage).
    """
    stages = [stage] if isinstance(stage, str) else list(stage)
    from absl import app, flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    from jaxgrad.runtime import make_configs_importable

    make_configs_importable()  # user configs may `from configs import demo`
    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
    workdir_flag = flags.DEFINE_string("workdir", None, "Run directory.")
    change_flag = define_on_config_change_flag()
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint at INFO
        from jaxgrad.runtime import enable_compilation_cache, resume_hint_on_interrupt

        enable_compilation_cache()  # $JAXGRAD_COMPILATION_CACHE, default ~/.cache/jaxgrad/xla
        config = config_flag.value
        for key, value in (overrides or {}).items():
            section, name = key.rsplit(".", 1)
            config[section][name] = value
        with resume_hint_on_interrupt():
            out = run_pipeline(config, workdir_flag.value, stages,
                               on_config_change=change_flag.value).get(stages[-1])
        print(out if isinstance(out, str) else json.dumps(out, indent=1, default=str)[:4000])

    app.run(main)


def define_on_config_change_flag():
    """``--on_config_change=error|rerun`` (default: ``config.pipeline.on_config_change``)."""
    from absl import flags

    return flags.DEFINE_enum(
        "on_config_change", None, ["error", "rerun"],
        "When a stage's artefacts in --workdir were computed under another config: 'error' "
        "(default; names the changed keys, deletes nothing) or 'rerun' (deletes that stage's "
        "artefacts and everything downstream, then recomputes). Default: "
        "config.pipeline.on_config_change.")


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
