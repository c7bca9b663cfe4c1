"""Running the stages in order (:func:`run_pipeline`), and the stages that follow the method's
steps: the final fine-tunes (:func:`stage_finetune`), fidelity and the report. The stages of the
steps themselves live in their packages (``train.stage``, ``gradients.stage``, ``groups.stage``,
``estimate.stage``, ``select.stage``); the checks made before the first stage are in
:mod:`jaxgrad.pipeline.validate`, the command-line entry points in :mod:`jaxgrad.pipeline.cli`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Sequence

import jax

from jaxgrad import rundir
from jaxgrad.common.checks import as_names
from jaxgrad.common.distributed import barrier, initialize_distributed
from jaxgrad.common.jsonio import read_json, write_shared_json
from jaxgrad.estimate.stage import stage_estimates
from jaxgrad.fidelity import run_fidelity
from jaxgrad.fingerprint import STAGE_ORDER, model_input_digests, stage_fingerprints
from jaxgrad.gradients.stage import stage_gradients
from jaxgrad.groups.stage import groups_enabled, pipeline_units, stage_groups
from jaxgrad.pipeline.validate import check_data_splits, validate_config
from jaxgrad.report import write_report
from jaxgrad.records import REGENERATED, artefacts_exist, make_record, reconcile, write_records
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
    if jax.process_index() != 0:  # one process writes the report
        return os.path.join(workdir, rundir.REPORT_FILE)
    return write_report(config, workdir)


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
        fresh = not artefacts_exist(workdir, name)  # else it resumes or extends what is there
        t0 = time.time()
        if not (name == "base" and not (config.get("base") or {}).get("pretrain", False)):
            # (no line for a base that is not built: a pretrained model is the base)
            print(f"[jaxgrad] stage {name} ..." + (" reused" if reused else ""), flush=True)
        out[name] = fns[name](cfg, workdir)
        timings[name] = time.time() - t0
        _append_timing(workdir, name, timings[name], reused or out[name] is None,
                       fingerprint=fp.fingerprint, fresh=fresh)
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


def _append_timing(workdir: str, stage: str, seconds: float, reused: bool = False,
                   fingerprint: str | None = None, fresh: bool = True) -> None:
    """One row per stage run; ``reused``: its artefacts existed under the same fingerprint, or it
    had nothing to do (a stage switched off): the report shows the seconds of computing runs.
    ``fresh``: the stage had no artefacts when it started; a run that was not fresh resumed or
    extended the computation of the rows before it under the same ``fingerprint`` (an
    interruption, a fine-tune run added to ``pipeline.finetune_runs``, more subsets), and the
    report adds their seconds."""
    if jax.process_index() != 0:
        return
    row = {"stage": stage, "seconds": round(seconds, 2), "time": time.time(), "reused": reused,
           "fingerprint": fingerprint, "fresh": fresh}
    with open(os.path.join(workdir, rundir.TIMINGS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")
