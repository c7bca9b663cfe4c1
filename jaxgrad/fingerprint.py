"""Per-stage config fingerprints: a pipeline stage reuses its artefacts only under the same config.

Each stage of :mod:`jaxgrad.pipeline` declares the config keys it reads (``STAGE_CONFIG``, dotted
prefixes) and the stages whose artefacts it reads (``STAGE_INPUTS``). Its fingerprint is a sha256
over those keys' values and its inputs' fingerprints, so the fingerprints form a chain: a change
to meta-training changes the fingerprints of gradients, estimates, selection, ... as well.

``<workdir>/stages.json`` holds one record per stage: the fingerprint, the fingerprints of its
inputs and every config value it depends on (its own and its inputs', to name what changed). A
record is written (atomically) before the stage starts, so a stage interrupted half-way resumes
only under the same fingerprint, and marked ``complete`` when the stage returns.

Before any stage runs, :func:`reconcile` compares the records of the stages to run, and of the
stages before them, with the config:

* artefacts on disk and the same fingerprint: the stage is skipped or resumed, as before;
* artefacts and another fingerprint: :class:`ConfigChangedError` names the earliest changed stage,
  the run directory and the changed keys (old → new); nothing is deleted. With
  ``pipeline.on_config_change = "rerun"`` (``--on_config_change=rerun``) the artefacts of that
  stage and of every stage after it are deleted instead, and the stages recompute;
* artefacts but no record (a run directory from before fingerprints): accepted with a warning and
  recorded with the current config.

Keys that cannot change a result are left out (``FINGERPRINT_EXCLUDE`` gives the reason for each),
as are the sections no stage reads (``mesh``, ``finetune``), the data section of the
other ``data.kind`` and, with a pretrained base, ``model.name_or_path`` / ``model.tokenizer``
(``pipeline.resolved_config`` points them at ``<workdir>/base``: a run directory can be moved).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Mapping, Sequence

from jaxgrad import counts

log = logging.getLogger("jaxgrad.pipeline")

RECORDS_FILE = "stages.json"
RECORDS_VERSION = 1
MODES = ("error", "rerun")

# Stages in order, with the stages whose artefacts each one reads.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "meta_train": ("base",),
    "gradients": ("meta_train",),
    # Optional: only with groups.by = "cluster"; off, it is no input of any stage (_off).
    "groups": ("gradients",),
    "estimates": ("gradients", "groups"),
    "selection": ("estimates", "gradients", "groups"),
    "finetune": ("base", "selection"),
    "fidelity": ("meta_train", "gradients", "estimates"),
    "report": ("estimates", "selection", "finetune", "fidelity"),
}
STAGE_ORDER = tuple(STAGE_INPUTS)

# The config keys (dotted prefixes) each stage reads itself.
STAGE_CONFIG: dict[str, tuple[str, ...]] = {
    # base.pretrain False: nothing is built and only that flag counts (see _own_values).
    "base": ("base", "model.scratch", "train.batch_size", "train.max_length"),
    "meta_train": ("model", "lora", "data", "train"),
    "gradients": ("gradients", "train.max_length"),
    "groups": ("groups",),
    "estimates": ("surrogate", "gradients.output_fn", "train.max_length"),
    "selection": ("selection", "data"),
    # finetune trains the base on each choice of sources with config.train (num_steps replaced by
    # pipeline.finetune_steps when > 0); config.finetune is overwritten per run by the stage.
    "finetune": ("pipeline.finetune_steps", "pipeline.finetune_seed", "model", "lora", "data",
                 "train"),
    # Fine-tunes θ* on subsets of the estimates table (only with pipeline.fidelity = True).
    "fidelity": ("fidelity", "surrogate", "gradients.output_fn", "gradients.eps", "train"),
    "report": ("data", "surrogate", "gradients.projection_dim", "gradients.output_fn"),
}

# Artefacts of each stage, relative to the run directory: their existence means the stage ran
# (fully or in part); "rerun" deletes them. DERIVED: further outputs deleted with a stage's
# (none at present; kept for outputs written outside the stages).
STAGE_ARTEFACTS: dict[str, tuple[str, ...]] = {
    "base": ("base", "base_run"),
    "meta_train": ("meta_train",),
    "gradients": ("gradients",),
    "groups": ("groups",),
    "estimates": ("estimates",),
    "selection": ("selection",),
    "finetune": ("finetune",),
    "fidelity": ("fidelity",),
    "report": ("report.md", "scores.png", "fidelity.png", "clusters.png"),
}
DERIVED: dict[str, tuple[str, ...]] = {}
# Stages that always recompute from their inputs (nothing to reuse): never a mismatch.
REGENERATED = ("report",)

# Keys that do not change any stage's result, with the reason; left out of every fingerprint.
FINGERPRINT_EXCLUDE: dict[str, str] = {
    "train.progress": "tqdm progress bar",
    "train.log_every": "train-loss rows in metrics.jsonl (logging only)",
    "train.eval_every": "evaluation cadence: parameters never depend on it, the final evaluation "
                        "always runs",
    "train.save_every": "checkpoint cadence: resume is exact",
    "train.keep_checkpoints": "how many old checkpoints are kept",
    "train.async_checkpoint": "checkpoint writes in the background or not",
    "train.best_metric": "which checkpoint is kept as 'best'; the pipeline reads the latest",
    "train.best_mode": "direction of best_metric (see train.best_metric)",
    "train.stop_after_steps": "interruption drill: a stage stopped early is not marked done and "
                              "resumes on the next run",
    "train.distributed": "how the processes start (jax.distributed.initialize)",
    "gradients.batch_size": "examples per jitted call: per-sample results do not depend on it "
                            "(tests/test_per_sample.py::test_independent_of_chunk_and_batch_size)",
    "gradients.chunk_size": "examples per vmap chunk (same test)",
    "gradients.shard_size": "store layout: a complete store is reused whatever its shard size; a "
                            "partial one refuses another shard size itself (StoreMismatchError)",
    "surrogate.chunk_subsets": "subsets per fit call / table flush: each subset is solved on its "
                               "own (tests/test_surrogate.py, chunked fits)",
    "surrogate.exact_chunk": "subsets per vmapped forward pass in exact mode (tests/"
                             "test_surrogate.py, exact_estimates chunk_size)",
    "pipeline.finetune_runs": "which final fine-tunes run: each one is computed or skipped on its "
                              "own under finetune/<name>",
    "pipeline.on_config_change": "what to do on a change (this mechanism)",
    "pipeline.fidelity": "whether the fidelity stage runs; its results, once there, do not depend "
                         "on the switch",
}
# Keys added after run directories existed, at the value that computes what was computed before
# the key existed: at that value a key is left out of the fingerprint, so those run directories
# still match; any other value counts as usual.
INERT_DEFAULTS: dict[str, Any] = {
    "pipeline.finetune_seed": -1,  # -1: train.seed / lora.seed, as before the key existed
    "selection.method": "ensemble",  # today's selection, as before the key existed
    "selection.threshold": 0.0,  # read by method "threshold" only
    "selection.min_gain": 0.0,  # read by methods "forward" / "ordered" only
}
# Sections no stage reads: mesh (device layout: the same computation), finetune (set per run by
# the finetune stage). Not in STAGE_CONFIG.


class ConfigChangedError(ValueError):
    """A stage's artefacts were computed with another config than the one given now."""

    def __init__(self, message: str, *, stage: str, workdir: str,
                 changes: Sequence[tuple[str, Any, Any]]):
        super().__init__(message)
        self.stage = stage
        self.workdir = workdir
        self.changes = list(changes)


@dataclasses.dataclass(frozen=True)
class StageFingerprint:
    """A stage's fingerprint, its inputs' fingerprints and every config value behind them."""

    stage: str
    fingerprint: str
    inputs: dict[str, str]
    config: dict[str, Any]  # own keys and the inputs' keys (what the fingerprint depends on)


_ABSENT = "<absent>"


def _canonical(value: Any) -> Any:
    from jaxgrad.checkpoint import jsonable

    return json.loads(json.dumps(jsonable(value), sort_keys=True))


def flatten_config(config: Any) -> dict[str, Any]:
    """``{"section.key.sub": value}`` for every leaf (JSON values; tuples as lists)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if isinstance(value, Mapping):
            for k in sorted(value, key=str):
                walk(f"{prefix}.{k}" if prefix else str(k), value[k])
        else:
            out[prefix] = _canonical(counts.canonical(value) if prefix in counts.SETTINGS
                                     else value)

    walk("", d)
    return out


def _excluded(key: str, flat: Mapping[str, Any]) -> bool:
    if key in FINGERPRINT_EXCLUDE:
        return True
    if key in INERT_DEFAULTS and flat.get(key) == INERT_DEFAULTS[key]:
        return True
    if flat.get("base.pretrain") and key in ("model.name_or_path", "model.tokenizer"):
        return True  # replaced by <workdir>/base (resolved_config)
    kind = flat.get("data.kind")
    if kind == "synthetic" and key.startswith("data.files."):
        return True
    if kind == "files" and key.startswith("data.synthetic."):
        return True
    return False


def _own_values(stage: str, flat: Mapping[str, Any]) -> dict[str, Any]:
    if stage == "base" and not flat.get("base.pretrain"):
        return {"base.pretrain": False}
    prefixes = STAGE_CONFIG[stage]
    return {k: v for k, v in flat.items()
            if any(k == p or k.startswith(p + ".") for p in prefixes) and not _excluded(k, flat)}


def _off(flat: Mapping[str, Any]) -> set[str]:
    """Optional stages that are off under ``flat`` and so are no input of any stage: ``groups``
    unless ``groups.by = "cluster"`` (every run directory from before the stage keeps its
    fingerprints)."""
    return set() if flat.get("groups.by") == "cluster" else {"groups"}


def stage_fingerprints(config: Any) -> dict[str, StageFingerprint]:
    """The fingerprint of every stage under ``config`` (the config as given, not resolved)."""
    flat = flatten_config(config)
    off = _off(flat)
    out: dict[str, StageFingerprint] = {}
    for stage in STAGE_ORDER:
        own = _own_values(stage, flat)
        deps = [d for d in STAGE_INPUTS[stage] if d not in off]
        inputs = {dep: out[dep].fingerprint for dep in deps}
        closure: dict[str, Any] = {}
        for dep in deps:
            closure.update(out[dep].config)
        closure.update(own)
        payload = json.dumps({"stage": stage, "config": own, "inputs": inputs}, sort_keys=True)
        out[stage] = StageFingerprint(stage, hashlib.sha256(payload.encode()).hexdigest(), inputs,
                                      dict(sorted(closure.items())))
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, old value, new value)]`` for the keys that differ (``"<absent>"`` if missing)."""
    changes = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            changes.append((k, a, b))
    return changes


# ------------------------------------------------------------------------------------------------
# stages.json


def records_path(workdir: str) -> str:
    return os.path.join(workdir, RECORDS_FILE)


def read_records(workdir: str) -> dict[str, dict]:
    """The per-stage records of ``<workdir>/stages.json`` ({} if there is none)."""
    path = records_path(workdir)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return dict(data.get("stages", {}))


def write_records(workdir: str, records: Mapping[str, dict]) -> None:
    """Write ``<workdir>/stages.json`` atomically (process 0 only)."""
    import jax

    if jax.process_index() != 0:
        return
    path = records_path(workdir)
    tmp = f"{path}.tmp{os.getpid()}"
    ordered = {s: records[s] for s in STAGE_ORDER if s in records}
    with open(tmp, "w") as f:
        json.dump({"version": RECORDS_VERSION, "stages": ordered}, f, indent=1)
    os.replace(tmp, path)


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
    path = os.path.join(workdir, "estimates", "settings.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        settings = json.load(f)
    old = dict(fp.config)
    old.update({f"surrogate.{k}": _canonical(v) for k, v in settings.items()
                if f"surrogate.{k}" in fp.config})
    if not config_changes(old, fp.config):
        return None
    return {"fingerprint": "estimates/settings.json", "config": old}


def _fmt(value: Any) -> str:
    return value if value is _ABSENT else json.dumps(value)


def _message(workdir: str, stage: str, rec: dict, fp: StageFingerprint, changes, stale: list[str],
             needed: Sequence[str], missing: Sequence[str], why: str = "") -> str:
    lines = [f"jaxgrad pipeline: stage {stage!r} in run directory {workdir} was computed with "
             f"another config than the one given now; its artefacts cannot be reused."]
    if changes:
        lines.append("Changed config keys (old → new):")
        lines += [f"  {k}: {_fmt(a)} → {_fmt(b)}" for k, a, b in changes]
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


def reconcile(workdir: str, fps: Mapping[str, StageFingerprint], stages: Sequence[str],
              mode: str = "error", skip: Sequence[str] = ()) -> dict[str, dict]:
    """Check the stages to run (and those before them) against their records; the records.

    ``skip``: stages not checked (an optional stage switched off); their artefacts are still
    deleted in "rerun" mode when a stage they read changed.

    Raises:
      ConfigChangedError: some stage's artefacts were computed under another config and ``mode``
        is "error" (nothing deleted), or "rerun" cannot recompute them with ``stages``.
    """
    import jax

    if mode not in MODES:
        raise ValueError(f"pipeline.on_config_change must be one of {MODES}, got {mode!r}")
    records = read_records(workdir)
    last = max(STAGE_ORDER.index(s) for s in stages)
    changed: list[tuple[str, dict]] = []
    adopted: list[str] = []
    for stage in STAGE_ORDER[: last + 1]:
        if stage in REGENERATED or stage in skip or not artefacts_exist(workdir, stage):
            continue
        rec = records.get(stage)
        if rec is None:
            rec = _legacy_record(workdir, stage, fps[stage])
            if rec is None:
                adopted.append(stage)
                continue
        if rec.get("fingerprint") != fps[stage].fingerprint:
            changed.append((stage, rec))
    deleted: list[str] = []
    if changed:
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
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pipeline/checked")
        if jax.process_index() == 0:
            for stage in ordered:
                deleted += delete_artefacts(workdir, stage)
        for stage in ordered:
            records.pop(stage, None)
        adopted = [s for s in adopted if s not in affected]
        log.warning("jaxgrad pipeline: config changed since stage %r ran in %s (%s); "
                    "on_config_change='rerun': deleted %s; recomputing from %r on", first, workdir,
                    "; ".join(f"{k}: {_fmt(a)} → {_fmt(b)}" for k, a, b in changes) or
                    "inputs recomputed", ", ".join(deleted) or "nothing", first)
    for stage in adopted:
        log.warning("jaxgrad pipeline: %s has artefacts of stage %r but no recorded config "
                    "fingerprint (a run directory from before %s existed); assuming they match "
                    "the current config and recording it", workdir, stage, RECORDS_FILE)
        records[stage] = make_record(fps[stage], complete=None, legacy=True)
    if adopted or changed:
        write_records(workdir, records)
    if changed and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pipeline/cleaned")
    return records
