"""Running the stages in order (:func:`run_pipeline`). Each stage lives with its step: the
method's in their packages (``train.stage``, ``gradients.stage``, ``groups.stage``,
``estimate.stage``, ``select.stage``), the ones after it here (:mod:`~jaxgrad.pipeline.finetune`,
:mod:`~jaxgrad.pipeline.fidelity`, :mod:`~jaxgrad.pipeline.report`); the checks made before the
first stage are in :mod:`jaxgrad.pipeline.validate`, the command-line entry points in
:mod:`jaxgrad.pipeline.cli`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence


from jaxgrad.common.distributed import barrier, initialize_distributed
from jaxgrad.config import ConfigError
from jaxgrad.estimate.stage import stage_estimates
from jaxgrad.gradients.stage import stage_gradients
from jaxgrad.groups.stage import groups_enabled, stage_groups
from jaxgrad.pipeline.fidelity import fidelity_enabled, stage_fidelity
from jaxgrad.pipeline.finetune import finetune_runs_done, stage_finetune
from jaxgrad.pipeline.fingerprint import STAGE_ORDER, model_input_digests, stage_fingerprints
from jaxgrad.pipeline.records import (REGENERATED, artefacts_exist, make_record, reconcile,
                                      write_records)
from jaxgrad.pipeline.report import stage_report
from jaxgrad.pipeline.timings import append_timing
from jaxgrad.pipeline.validate import check_data_splits, validate_config
from jaxgrad.rundir import resolved_config
from jaxgrad.select.stage import stage_selection
from jaxgrad.train.stage import stage_base, stage_meta_train

log = logging.getLogger("jaxgrad.pipeline")

STAGES = ("base", "meta_train", "gradients", "groups", "estimates", "selection", "finetune",
          "fidelity", "report")
assert STAGES == STAGE_ORDER  # pipeline.fingerprint declares each stage's inputs and config keys


def run_pipeline(config, workdir: str, stages: Sequence[str] | None = None,
                 on_config_change: str | None = None) -> dict:
    """Run the stages in order (all by default), skipping those whose artefacts exist.

    Artefacts are reused only if they were computed under the same config (their stage's
    fingerprint, see :mod:`jaxgrad.pipeline.fingerprint`); the stages before those run are checked too.

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
      A stage interrupted (``KeyboardInterrupt``) gets its ``timings.jsonl`` row too, so the
      report adds its seconds to those of the run that resumes it.

    Raises:
      ConfigError: an unknown stage name, or a config :func:`validate_config` refuses.
    """
    stages = list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:  # a ConfigError: the scripts print it as one line (--stages=foo)
        raise ConfigError(f"--stages: unknown pipeline stages {unknown}; expected some of "
                          f"{list(STAGES)}")
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
           "groups": stage_groups, "estimates": stage_estimates, "selection": stage_selection,
           "finetune": stage_finetune, "fidelity": stage_fidelity, "report": stage_report}
    out = {}
    for name in STAGES:
        if name not in stages:
            continue
        if name in skip:  # an optional stage switched off: nothing runs, its record is kept
            out[name] = None
            continue
        fp = fingerprints[name]
        reused = _reused_or_started(config, workdir, name, fp, records)
        cfg = config if name == "base" else resolved_config(config, workdir)
        if not (name == "base" and not (config.get("base") or {}).get("pretrain", False)):
            # (no line for a base that is not built: a pretrained model is the base)
            print(f"[jaxgrad] stage {name} ..." + (" reused" if reused else ""), flush=True)
        out[name], timings[name] = _timed_stage(fns[name], cfg, workdir, name, fp, reused)
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


def _timed_stage(fn, cfg, workdir: str, name: str, fp, reused: bool):
    """``fn(cfg, workdir)``, stage ``name``, and its seconds; its ``timings.jsonl`` row is written
    also when Ctrl-C stops it, so that its time counts with the run that resumes it."""
    fresh = not artefacts_exist(workdir, name)  # else it resumes or extends what is there
    t0 = time.time()
    try:
        result = fn(cfg, workdir)
    except KeyboardInterrupt:
        append_timing(workdir, name, time.time() - t0, reused, fingerprint=fp.fingerprint,
                      fresh=fresh)
        raise
    seconds = time.time() - t0
    append_timing(workdir, name, seconds, reused or result is None, fingerprint=fp.fingerprint,
                  fresh=fresh)
    return result, seconds


def _reused_or_started(config, workdir: str, name: str, fp, records: dict) -> bool:
    """Whether stage ``name``'s artefacts are complete under fingerprint ``fp`` (it is reused);
    if they are not, its record says so (written before the stage writes anything: a half-done
    stage resumes only under this config)."""
    rec = records.get(name, {})
    reused = bool(name not in REGENERATED and rec.get("fingerprint") == fp.fingerprint
                  and rec.get("complete") and artefacts_exist(workdir, name)
                  and (name != "finetune" or finetune_runs_done(config, workdir)))
    if rec.get("fingerprint") != fp.fingerprint or (
            rec.get("complete") and not artefacts_exist(workdir, name)):
        records[name] = make_record(fp, complete=False)
        write_records(workdir, records)
    return reused
