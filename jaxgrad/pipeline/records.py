"""``stages.json`` and the reuse decisions: a pipeline stage reuses its artefacts only under the
same fingerprint (:mod:`jaxgrad.pipeline.fingerprint`).

``<workdir>/stages.json`` holds one record per stage: the fingerprint, the fingerprints of its
inputs and every config value it depends on (its own and its inputs', to name what changed). A
record is written (atomically) before the stage starts, so a stage interrupted half-way resumes
only under the same fingerprint, and marked ``complete`` when the stage returns.

Before any stage runs, :func:`reconcile` compares the records of the stages to run, and of the
stages before them, with the config:

* artefacts on disk and the same fingerprint: the stage is skipped or resumed, as before;
* artefacts and another fingerprint: :class:`~jaxgrad.pipeline.fingerprint.ConfigChangedError` names the
  earliest changed stage, the run directory and the changed keys (old → new); nothing is deleted.
  With ``pipeline.on_config_change = "rerun"`` (``--on_config_change=rerun``) the artefacts of
  that stage and of every stage after it are deleted instead, and the stages recompute;
* artefacts but no record (a run directory from before fingerprints): accepted with a warning and
  recorded with the current config;
* a record from before the base model's file hashes (``inputs.model.*``) that matches the config
  alone: adopted, the files assumed unchanged and their hashes recorded now.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Mapping, Sequence

import jax

from jaxgrad.common.distributed import barrier
from jaxgrad.common.jsonio import read_json, write_json
from jaxgrad.config import CONFIG_CHANGE_MODES
from jaxgrad.pipeline.fingerprint import (RECORDS_VERSION, STAGE_INPUTS, STAGE_ORDER,
                                          ConfigChangedError, StageFingerprint, _canonical,
                                          config_changes, format_value)
from jaxgrad.rundir import LEGACY_ESTIMATES_SETTINGS, RECORDS_FILE, STAGE_ARTEFACTS

log = logging.getLogger("jaxgrad.pipeline")

# Artefacts of each stage: jaxgrad.rundir.STAGE_ARTEFACTS. DERIVED: further outputs deleted with
# a stage's (none at present; kept for outputs written outside the stages).
DERIVED: dict[str, tuple[str, ...]] = {}
# Stages that always recompute from their inputs (nothing to reuse): never a mismatch.
REGENERATED = ("report",)


def records_path(workdir: str) -> str:
    return os.path.join(workdir, RECORDS_FILE)


def read_records(workdir: str) -> dict[str, dict]:
    """The per-stage records of ``<workdir>/stages.json`` ({} if there is none)."""
    path = records_path(workdir)
    if not os.path.isfile(path):
        return {}
    return dict(read_json(path).get("stages", {}))


def write_records(workdir: str, records: Mapping[str, dict]) -> None:
    """Write ``<workdir>/stages.json`` atomically (process 0 only)."""
    ordered = {s: records[s] for s in STAGE_ORDER if s in records}
    write_json(records_path(workdir), {"version": RECORDS_VERSION, "stages": ordered})


def make_record(fp: StageFingerprint, *, complete: bool | None, legacy: bool = False) -> dict:
    rec = {"fingerprint": fp.fingerprint, "inputs": fp.inputs, "complete": complete,
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": fp.config}
    if legacy:
        rec["legacy"] = True  # artefacts found without a record; assumed to match
    return rec


def artefacts_exist(workdir: str, stage: str) -> bool:
    return any(os.path.exists(os.path.join(workdir, p)) for p in STAGE_ARTEFACTS[stage])


def delete_artefacts(workdir: str, stage: str) -> list[str]:
    """Delete ``stage``'s artefacts (and their derived outputs); the paths deleted."""
    deleted = []
    for rel in STAGE_ARTEFACTS[stage] + DERIVED.get(stage, ()):
        path = os.path.join(workdir, rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        deleted.append(path)
    return deleted


def _legacy_record(workdir: str, stage: str, fp: StageFingerprint) -> dict | None:
    """What an old run directory tells about a stage without a record: the estimates stage kept
    its surrogate settings in ``estimates/settings.json`` (compared as a record would be)."""
    if stage == "fidelity":
        # Fine-tunes from before records existed used other defaults (60 AdamW steps): their
        # settings cannot be told from the config, so they count as changed.
        old = dict(fp.config)
        old["fidelity (unrecorded)"] = f"{workdir}/fidelity from before {RECORDS_FILE}"
        return {"fingerprint": "unrecorded fidelity/", "config": old}
    if stage != "estimates":
        return None
    path = os.path.join(workdir, LEGACY_ESTIMATES_SETTINGS)
    if not os.path.isfile(path):
        return None
    settings = read_json(path)
    old = dict(fp.config)
    old.update({f"surrogate.{k}": _canonical(v) for k, v in settings.items()
                if f"surrogate.{k}" in fp.config})
    if not config_changes(old, fp.config):
        return None
    return {"fingerprint": "estimates/settings.json", "config": old}


def _message(workdir: str, stage: str, rec: dict, fp: StageFingerprint, changes, stale: list[str],
             needed: Sequence[str], missing: Sequence[str], why: str = "") -> str:
    lines = [f"jaxgrad pipeline: stage {stage!r} in run directory {workdir} was computed with "
             f"another config or other input files than those given now; its artefacts cannot "
             "be reused."]
    if changes:
        lines.append("Changed config keys (old → new):")
        lines += [f"  {k}: {format_value(a)} → {format_value(b)}" for k, a, b in changes]
    else:
        changed_inputs = [d for d, f in fp.inputs.items() if rec.get("inputs", {}).get(d) != f]
        lines.append(f"The stages it reads ({', '.join(changed_inputs) or 'its inputs'}) were "
                     "recomputed since.")
    if len(stale) > 1:
        lines.append(f"Stale with it (they depend on it): {', '.join(stale[1:])}.")
    if why:
        lines.append(why)
    extra = f" and --stages={','.join(needed)} (at least)" if missing else ""
    lines += ["Either:",
              "  * use a new run directory (--workdir) for the new config, or",
              f"  * recompute: pass --on_config_change=rerun (config key "
              f"pipeline.on_config_change='rerun'){extra}; this deletes the artefacts of "
              f"{', '.join(stale)} in {workdir} and recomputes from {stage!r} on.",
              "Nothing was deleted."]
    return "\n".join(lines)


def downstream(stage: str) -> list[str]:
    """``stage`` and every stage that reads its artefacts, directly or not, in pipeline order."""
    out = {stage}
    for s in STAGE_ORDER:
        if any(dep in out for dep in STAGE_INPUTS[s]):
            out.add(s)
    return [s for s in STAGE_ORDER if s in out]


def _compare(workdir: str, stage: str, fps: Mapping[str, StageFingerprint],
             records: Mapping[str, dict],
             config_only: Mapping[str, StageFingerprint] | None) -> tuple[str, dict | None]:
    """What the record of ``stage`` (whose artefacts exist) says: ``("same", rec)``;
    ``("adopted", None)``: no record (a run directory from before records), assumed to match;
    ``("upgraded", rec)``: a record from before the ``inputs.*`` keys that matches
    ``config_only``; ``("changed", rec)``: computed under another config (``rec`` may be the
    legacy record of :func:`_legacy_record`)."""
    rec = records.get(stage)
    if rec is None:
        rec = _legacy_record(workdir, stage, fps[stage])
        if rec is None:
            return "adopted", None
    if rec.get("fingerprint") == fps[stage].fingerprint:
        return "same", rec
    if (config_only is not None and rec.get("fingerprint") == config_only[stage].fingerprint
            and not any(k.startswith("inputs.") for k in rec.get("config", {}))):
        return "upgraded", rec
    return "changed", rec


def _rerun_from(workdir: str, fps: Mapping[str, StageFingerprint], stages: Sequence[str],
                mode: str, skip: Sequence[str], changed: Sequence[tuple[str, dict]],
                records: dict[str, dict]) -> set[str]:
    """Act on the ``changed`` stages (with their records, in pipeline order): raise in "error"
    mode, or when ``stages`` leave out a stage that must recompute; in "rerun" mode delete the
    artefacts of every changed stage and of whatever reads it (process 0) and drop their
    ``records``. The stages affected."""
    last = max(STAGE_ORDER.index(s) for s in stages)
    first, rec = changed[0]
    # Stale: every changed stage and whatever reads it (not merely the stages after it: the
    # fidelity fine-tunes stay valid when only selection or the final fine-tunes change).
    affected = set().union(*(downstream(stage) for stage, _ in changed))
    ordered = [s for s in STAGE_ORDER if s in affected]
    stale = [s for s in ordered if artefacts_exist(workdir, s)]
    changes = config_changes(rec.get("config", {}), fps[first].config)
    needed = [s for s in ordered if STAGE_ORDER.index(s) <= last
              and not (s in skip and s not in stages)]
    missing = [s for s in needed if s not in stages]
    why = ""
    if mode == "rerun" and missing:
        why = (f"on_config_change='rerun' recomputes from {first!r} on, but the stages to run "
               f"leave out {', '.join(missing)}.")
    if mode == "error" or missing:
        raise ConfigChangedError(
            _message(workdir, first, rec, fps[first], changes, stale, needed, missing, why),
            stage=first, workdir=workdir, changes=changes)
    barrier("pipeline/checked")
    deleted: list[str] = []
    if jax.process_index() == 0:
        for stage in ordered:
            deleted += delete_artefacts(workdir, stage)
    for stage in ordered:
        records.pop(stage, None)
    log.warning("jaxgrad pipeline: config changed since stage %r ran in %s (%s); "
                "on_config_change='rerun': deleted %s; recomputing from %r on", first, workdir,
                "; ".join(f"{k}: {format_value(a)} → {format_value(b)}" for k, a, b in changes) or
                "inputs recomputed", ", ".join(deleted) or "nothing", first)
    return affected


def reconcile(workdir: str, fps: Mapping[str, StageFingerprint], stages: Sequence[str],
              mode: str = "error", skip: Sequence[str] = (),
              config_only: Mapping[str, StageFingerprint] | None = None) -> dict[str, dict]:
    """Check the stages to run (and those before them) against their records; the records.

    ``skip``: stages not checked (an optional stage switched off); their artefacts are still
    deleted in "rerun" mode when a stage they read changed. ``config_only``: the fingerprints
    without ``inputs.*`` keys; a record from before those keys that matches them is adopted.

    Raises:
      ConfigChangedError: some stage's artefacts were computed under another config and ``mode``
        is "error" (nothing deleted), or "rerun" cannot recompute them with ``stages``.
    """
    if mode not in CONFIG_CHANGE_MODES:
        raise ValueError(f"pipeline.on_config_change must be one of {CONFIG_CHANGE_MODES}, got {mode!r}")
    records = read_records(workdir)
    last = max(STAGE_ORDER.index(s) for s in stages)
    changed: list[tuple[str, dict]] = []
    adopted: list[str] = []
    upgraded: list[str] = []
    for stage in STAGE_ORDER[: last + 1]:
        if stage in REGENERATED or stage in skip or not artefacts_exist(workdir, stage):
            continue
        verdict, rec = _compare(workdir, stage, fps, records, config_only)
        if verdict == "adopted":
            adopted.append(stage)
        elif verdict == "upgraded":
            upgraded.append(stage)
        elif verdict == "changed":
            changed.append((stage, rec))
    for stage in upgraded:  # the files are assumed unchanged, their hashes recorded now
        records[stage] = make_record(fps[stage], complete=records[stage].get("complete"),
                                     legacy=records[stage].get("legacy", False))
    if changed:
        affected = _rerun_from(workdir, fps, stages, mode, skip, changed, records)
        adopted = [s for s in adopted if s not in affected]
    for stage in adopted:
        log.warning("jaxgrad pipeline: %s has artefacts of stage %r but no recorded config "
                    "fingerprint (a run directory from before %s existed); assuming they match "
                    "the current config and recording it", workdir, stage, RECORDS_FILE)
        records[stage] = make_record(fps[stage], complete=None, legacy=True)
    if upgraded:
        log.warning("jaxgrad pipeline: recorded the base model's file hashes for %s in %s "
                    "(its records predate them; the files are assumed unchanged)",
                    ", ".join(upgraded), workdir)
    if adopted or changed or upgraded:
        write_records(workdir, records)
    if changed:
        barrier("pipeline/cleaned")
    return records
