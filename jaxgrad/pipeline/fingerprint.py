"""Per-stage config fingerprints: a pipeline stage reuses its artefacts only under the same config.

Each stage of :mod:`jaxgrad.pipeline` declares the config keys it reads (``STAGE_CONFIG``, dotted
prefixes) and the stages whose artefacts it reads (``STAGE_INPUTS``). Its fingerprint is a sha256
over those keys' values and its inputs' fingerprints, so the fingerprints form a chain: a change
to meta-training changes the fingerprints of gradients, estimates, selection, ... as well.

The records of ``<workdir>/stages.json`` and the decision to reuse, resume or recompute a
stage are :mod:`jaxgrad.pipeline.records`' (:func:`jaxgrad.pipeline.records.reconcile`); the
record of each final fine-tune (``run.json``) is :mod:`jaxgrad.pipeline.finetune`'s.

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
import os
from typing import Any, Mapping, Sequence

import jax

from jaxgrad.common import counts
from jaxgrad.common.checks import as_names
from jaxgrad.common.digest import file_sha256
from jaxgrad.common.jsonio import atomic_write_json, jsonable
from jaxgrad.config import COLUMN_ROLES, NAME_LISTS
from jaxgrad.rundir import HASHES_FILE

RECORDS_VERSION = 1  # of stages.json (pipeline.records) and of each fine-tune's run.json (.finetune)

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
                            "(tests/gradients/test_per_sample.py::test_independent_of_chunk_and_batch_size)",
    "gradients.chunk_size": "examples per vmap chunk (same test)",
    "gradients.shard_size": "store layout: a complete store is reused whatever its shard size; a "
                            "partial one refuses another shard size itself (StoreMismatchError)",
    "surrogate.chunk_subsets": "subsets per fit call / table flush: each subset is solved on its "
                               "own (tests/estimate/test_surrogate.py, chunked fits)",
    "surrogate.exact_chunk": "subsets per vmapped forward pass in exact mode (tests/"
                             "estimate/test_lift.py, exact_estimates chunk_size)",
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


def _names(value: Any) -> Any:
    """A :data:`~jaxgrad.config.NAME_LISTS` value as its names: ``("add,sub",)`` (a tuple key
    set on the command line) and ``("add", " sub")`` are ``["add", "sub"]``; a string stays a
    string, with the spaces around its commas dropped. A value already in that form (every run
    directory's record) is unchanged, so no fingerprint changes."""
    if isinstance(value, str):
        return ",".join(as_names(value)) if "," in value else value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(as_names(value))
    return value


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
            if prefix in NAME_LISTS:
                value = _names(value)
            out[prefix] = _canonical(counts.canonical(value) if prefix in counts.SETTINGS
                                     else value)

    walk("", d)
    return out


def excluded(key: str, flat: Mapping[str, Any]) -> bool:
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
            if any(k == p or k.startswith(p + ".") for p in prefixes) and not excluded(k, flat)}


def _off(flat: Mapping[str, Any]) -> set[str]:
    """Optional stages that are off under ``flat`` and so are no input of any stage: ``groups``
    unless ``groups.by = "cluster"`` (every run directory from before the stage keeps its
    fingerprints)."""
    return set() if flat.get("groups.by") == "cluster" else {"groups"}


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
            hit = [st.st_size, st.st_mtime_ns, file_sha256(f)]
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


def format_value(value: Any) -> str:
    """A config value as a change message shows it: JSON, or ``<absent>``."""
    return value if value is _ABSENT else json.dumps(value)
