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

Besides config keys, the base model's files are inputs: ``inputs.model.<path>`` holds a sha256 of
each file of a local ``model.name_or_path`` (a directory's top-level files, or the GGUF file)
and of a local ``model.tokenizer`` (:func:`model_input_digests`). Hashes are recorded once per
file in ``<workdir>/input_hashes.json`` and recomputed only when a file's size or modification
time changes, so a multi-GB checkpoint is read once. A record written before these keys existed
is adopted when it matches the config alone (the files are assumed unchanged, and recorded now).
The data's contents are checked by ``jaxgrad.pipeline.check_data_splits`` (the splits' example
ids hash every prompt and completion).

Keys that cannot change a result are left out (``FINGERPRINT_EXCLUDE`` gives the reason for each),
as are the sections no stage reads (``mesh``, ``finetune``), the data section of the
other ``data.kind`` and, with a pretrained base, ``model.name_or_path`` / ``model.tokenizer``
(``jaxgrad.rundir.resolved_config`` points them at ``<workdir>/base``: a run directory can be moved).
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

import jax

from jaxgrad._compat import moved_names
from jaxgrad.common import counts
from jaxgrad.common.distributed import barrier
from jaxgrad.common.jsonio import atomic_write_json, jsonable, read_json, write_json
from jaxgrad.config import COLUMN_ROLES, CONFIG_CHANGE_MODES
from jaxgrad.rundir import (CONFIG_FILE, HASHES_FILE, LEGACY_ESTIMATES_SETTINGS, RECORDS_FILE,
                            RUN_FILE, STAGE_ARTEFACTS)

log = logging.getLogger("jaxgrad.pipeline")

RECORDS_VERSION = 1

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
    "meta_train": ("model", "lora", "data", "train", "inputs.model"),
    "gradients": ("gradients", "train.max_length"),
    "groups": ("groups",),
    "estimates": ("surrogate", "gradients.output_fn", "train.max_length"),
    "selection": ("selection", "data"),
    # finetune trains the base on each choice of sources with config.train (num_steps replaced by
    # pipeline.finetune_steps when > 0); config.finetune is overwritten per run by the stage.
    "finetune": ("pipeline.finetune_steps", "pipeline.finetune_seed", "model", "lora", "data",
                 "train", "inputs.model"),
    # Fine-tunes θ* on subsets of the estimates table (only with pipeline.fidelity = True).
    "fidelity": ("fidelity", "surrogate", "gradients.output_fn", "gradients.eps", "train"),
    "report": ("data", "surrogate", "gradients.projection_dim", "gradients.output_fn"),
}

# Artefacts of each stage: jaxgrad.rundir.STAGE_ARTEFACTS. DERIVED: further outputs deleted with
# a stage's (none at present; kept for outputs written outside the stages).
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
    # configs list every column role since they became settable on the command line;
    # "" keeps the format's default column, as a role left out did
    **{f"data.files.columns.{role}": "" for role in COLUMN_ROLES},
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




def _sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _model_files(path: str) -> list[str]:
    """The files of a local model path that decide its weights and tokenizer: a file itself, or
    a directory's regular top-level files (hidden files and ``*.md`` left out)."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, f) for f in os.listdir(path)
                  if not f.startswith(".") and not f.endswith(".md")
                  and os.path.isfile(os.path.join(path, f)))


def model_input_digests(config: Any, workdir: str | None = None) -> dict[str, str]:
    """``{"inputs.model.<file>": "sha256:<hex>"}`` for the local files of the base model and
    tokenizer (``model.name_or_path``, ``model.tokenizer``); {} for a model built from scratch,
    a base pretrained by the pipeline (its config keys decide it) or a Hub name.

    With ``workdir``, hashes are cached in ``<workdir>/input_hashes.json`` keyed by the file's
    absolute path, size and modification time (process 0 writes it).
    """
    flat = flatten_config(config)
    if flat.get("base.pretrain"):
        return {}
    paths = [str(flat.get(k) or "") for k in ("model.name_or_path", "model.tokenizer")]
    files = [f for p in paths if p and p != "char" and os.path.exists(os.path.expanduser(p))
             for f in _model_files(os.path.expanduser(p))]
    if not files:
        return {}
    cache_path = os.path.join(workdir, HASHES_FILE) if workdir else None
    cache: dict[str, Any] = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    out, dirty = {}, False
    for f in files:
        st = os.stat(f)
        key = os.path.abspath(f)
        hit = cache.get(key)
        if not (isinstance(hit, list) and hit[:2] == [st.st_size, st.st_mtime_ns]):
            hit = [st.st_size, st.st_mtime_ns, _sha256_file(f)]
            cache[key], dirty = hit, True
        out[f"inputs.model.{f}"] = f"sha256:{hit[2]}"
    if dirty and cache_path and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        atomic_write_json(cache_path, cache, sort_keys=True)
    return out


def stage_fingerprints(config: Any, inputs: Mapping[str, Any] | None = None
                       ) -> dict[str, StageFingerprint]:
    """The fingerprint of every stage under ``config`` (the config as given, not resolved) and
    ``inputs`` (``inputs.*`` values: :func:`model_input_digests`; None: config keys only)."""
    flat = flatten_config(config)
    flat.update(inputs or {})
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


def _fmt(value: Any) -> str:
    return value if value is _ABSENT else json.dumps(value)


def _message(workdir: str, stage: str, rec: dict, fp: StageFingerprint, changes, stale: list[str],
             needed: Sequence[str], missing: Sequence[str], why: str = "") -> str:
    lines = [f"jaxgrad pipeline: stage {stage!r} in run directory {workdir} was computed with "
             f"another config or other input files than those given now; its artefacts cannot "
             "be reused."]
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
        rec = records.get(stage)
        if rec is None:
            rec = _legacy_record(workdir, stage, fps[stage])
            if rec is None:
                adopted.append(stage)
                continue
        if rec.get("fingerprint") != fps[stage].fingerprint:
            if (config_only is not None and rec.get("fingerprint") == config_only[stage].fingerprint
                    and not any(k.startswith("inputs.") for k in rec.get("config", {}))):
                upgraded.append(stage)
                continue
            changed.append((stage, rec))
    for stage in upgraded:  # the files are assumed unchanged, their hashes recorded now
        records[stage] = make_record(fps[stage], complete=records[stage].get("complete"),
                                     legacy=records[stage].get("legacy", False))
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
        barrier("pipeline/checked")
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
    if upgraded:
        log.warning("jaxgrad pipeline: recorded the base model's file hashes for %s in %s "
                    "(its records predate them; the files are assumed unchanged)",
                    ", ".join(upgraded), workdir)
    if adopted or changed or upgraded:
        write_records(workdir, records)
    if changed:
        barrier("pipeline/cleaned")
    return records


# ------------------------------------------------------------------------------------------------
# Final fine-tunes made one at a time (scripts/finetune.py, and each run of the finetune stage)

RUN_SECTIONS = ("model", "lora", "data", "train", "inputs")


def finetune_run_values(config: Any, workdir: str, units: Sequence[str],
                        train_ids: Sequence[str]) -> dict[str, Any]:
    """What a fine-tune's result depends on: the config keys of ``model``, ``lora``, ``data``,
    ``train`` (the exclusions of the stage fingerprints apply), the base model's file hashes,
    the units trained on (``finetune.units``) and a sha256 of their train example ids
    (``finetune.train_examples``: it changes with the data or a groups file)."""
    flat = flatten_config(config)
    flat.update(model_input_digests(config, workdir))
    values = {k: v for k, v in flat.items()
              if k.split(".", 1)[0] in RUN_SECTIONS and not _excluded(k, flat)}
    values["finetune.units"] = [str(u) for u in units]
    ids = json.dumps(sorted(str(i) for i in train_ids))
    values["finetune.train_examples"] = (f"{len(train_ids)} examples, sha256:"
                                         f"{hashlib.sha256(ids.encode()).hexdigest()[:16]}")
    return values


def check_finetune_run(run_dir: str, values: Mapping[str, Any], mode: str = "error") -> str:
    """Whether the fine-tune in ``run_dir`` was made with ``values`` (:func:`finetune_run_values`).

    Returns "new" (nothing there, or deleted in "rerun" mode: train from scratch), "same"
    (resume or reuse). ``run_dir/run.json`` is written (process 0) before training starts. A
    directory from before run records is compared through its ``config.json`` (config keys
    only) and adopted when they agree.

    Raises:
      ConfigChangedError: the run was made with other values and ``mode`` is "error"; it names
        the run directory and the changed keys, and deletes nothing.
      ValueError: ``mode`` outside :data:`CONFIG_CHANGE_MODES`.
    """
    if mode not in CONFIG_CHANGE_MODES:
        raise ValueError(f"pipeline.on_config_change must be one of {CONFIG_CHANGE_MODES}, got {mode!r}")
    path = os.path.join(run_dir, RUN_FILE)
    old: dict[str, Any] | None = None
    if os.path.isfile(path):
        old = read_json(path)["values"]
    elif os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):  # before run records
        flat = flatten_config(read_json(os.path.join(run_dir, CONFIG_FILE)))
        old = {k: v for k, v in flat.items()
               if k.split(".", 1)[0] in RUN_SECTIONS and not _excluded(k, flat)}
        old.update({k: v for k, v in values.items() if k not in old and
                    (k.startswith("inputs.") or k.startswith("finetune."))})
    status = "new" if not os.path.isdir(run_dir) else "same"
    if old is not None:
        changes = config_changes(old, dict(values))
        if changes and mode == "error":
            lines = [f"jaxgrad finetune: {run_dir} holds a fine-tune made with other settings; "
                     "it cannot be reused or resumed.", "Changed (old → new):"]
            lines += [f"  {k}: {_fmt(a)} → {_fmt(b)}" for k, a, b in changes[:20]]
            lines += ["Either give this fine-tune another name (--config.finetune.name=...), or "
                      "retrain it: --config.pipeline.on_config_change=rerun deletes "
                      f"{run_dir} first. Nothing was deleted."]
            raise ConfigChangedError("\n".join(lines), stage="finetune", workdir=run_dir,
                                     changes=changes)
        if changes:
            status = "new"
    barrier(f"finetune/checked/{os.path.basename(run_dir)}")  # all read the old record first
    if jax.process_index() == 0:
        if old is not None and changes:
            shutil.rmtree(run_dir)
            print(f"[jaxgrad] finetune: settings changed since {run_dir} was trained ("
                  + "; ".join(f"{k}: {_fmt(a)} → {_fmt(b)}" for k, a, b in changes[:5])
                  + "); on_config_change='rerun': deleted it, training again", flush=True)
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_json(path, {"version": RECORDS_VERSION, "values": dict(sorted(values.items()))})
    barrier(f"finetune/recorded/{os.path.basename(run_dir)}")  # nobody trains in it before
    return status


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
