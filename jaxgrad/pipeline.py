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
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import time
from typing import Any, Sequence

import jax

from jaxgrad._compat import moved_names
from jaxgrad import rundir
from jaxgrad.common import counts
from jaxgrad.common.checks import as_names
from jaxgrad.common.counts import check_fraction_or_count, fraction_or_count
from jaxgrad.common.distributed import barrier, initialize_distributed
from jaxgrad.common.jsonio import read_json, write_json, write_shared_json
from jaxgrad.config import (CHOICES, FINETUNE_RUNS, MeshConfig, ModelSpec, TrainConfig,
                            default_config)
from jaxgrad.data.sources import load_data
from jaxgrad.estimate.stage import stage_estimates
from jaxgrad.fidelity import run_fidelity
from jaxgrad.fingerprint import (STAGE_ORDER, ConfigChangedError, model_input_digests,
                                 stage_fingerprints)
from jaxgrad.gradients.stage import stage_gradients
from jaxgrad.groups.stage import groups_enabled, pipeline_units, stage_groups
from jaxgrad.groups.units import GroupsSpec
from jaxgrad.models.hf_config import resolve_dtype
from jaxgrad.records import (REGENERATED, artefacts_exist, delete_artefacts, downstream,
                             make_record, read_records, reconcile, write_records)
from jaxgrad.rundir import resolved_config
from jaxgrad.select.stage import stage_selection
from jaxgrad.train.final_finetune import finetune
from jaxgrad.train.stage import stage_base, stage_meta_train, stopped_early

log = logging.getLogger("jaxgrad.pipeline")

STAGES = ("base", "meta_train", "gradients", "groups", "estimates", "selection", "finetune",
          "fidelity", "report")
assert STAGES == STAGE_ORDER  # jaxgrad.fingerprint declares each stage's inputs and config keys


# ------------------------------------------------------------------------------------------------
# stages (those of the method's steps live in their packages: train, gradients, groups,
# estimate, select)


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
