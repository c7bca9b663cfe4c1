"""The final fine-tunes: the *base* model with fresh adapters, trained on the selected sources
(or units of a groups record), validated and tested on the target; one per run of
``pipeline.finetune_runs`` (:func:`stage_finetune`: the selection and the baselines), or one named
by ``config.finetune`` (:func:`finetune`, ``scripts/finetune.py``).

Each fine-tune records what its result depends on in ``finetune/<name>/run.json``
(:func:`finetune_run_values`, checked by :func:`check_finetune_run` before anything is loaded):
one made with other settings is refused by name, never silently resumed or returned.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from typing import Any, Mapping, Sequence

import jax

from jaxgrad import rundir
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.common.distributed import barrier, describe_devices, initialize_distributed
from jaxgrad.common.checks import as_names
from jaxgrad.common.jsonio import atomic_write_json, read_json, write_shared_json
from jaxgrad.config import CONFIG_CHANGE_MODES, ConfigError, ModelSpec, TrainConfig
from jaxgrad.data.batching import num_batches
from jaxgrad.data.sources import load_data
from jaxgrad.groups.stage import pipeline_units
from jaxgrad.groups.units import Units
from jaxgrad.models.loading import load_model, lora_from_config
from jaxgrad.pipeline.fingerprint import (RECORDS_VERSION, ConfigChangedError, config_changes,
                                          excluded, flatten_config, format_value,
                                          model_input_digests)
from jaxgrad.rundir import CONFIG_FILE, RUN_FILE
from jaxgrad.train import checkpoint as ckpt_lib
from jaxgrad.train.evaluate import choice_metrics, make_evaluator
from jaxgrad.train.loop import MetricsLog, TrainResult, fit, save_adapter
from jaxgrad.train.stage import save_config, stopped_early


def finetune_run_name(sources: Sequence[str]) -> str:
    """A directory name for a fine-tune on ``sources`` when ``finetune.name`` is empty.

    The names joined by ``+`` when that is a plain, unambiguous file name (letters, digits,
    ``-_.`` and no ``+`` inside a name); otherwise a slug of them plus 8 hex digits of the SHA-1
    of their JSON list, so two different lists never share a directory and a name like
    ``q&a/v2`` never becomes a path. The exact list is in the run's ``sources.json``.
    """
    sources = [str(s) for s in sources]
    plain = all(re.fullmatch(r"[A-Za-z0-9_.-]+", s) and s not in (".", "..") for s in sources)
    joined = "+".join(sources)
    if plain and len(joined) <= 120:
        return joined
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", joined).strip("._")[:60] or "sources"
    digest = hashlib.sha1(json.dumps(sources).encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}"


def finetune_sources(section: Any, available: Sequence[str]) -> list[str]:
    """The sources ``config.finetune`` names: ``sources`` or ``selection_file``.

    ``sources`` is a list, a JSON list in a string (``'["a,b", "c++"]'``: names may hold any
    character) or comma-separated names (``"a,b"``, for names without commas); ``selection_file``
    is a JSON list, a JSON object with a "selected" list (the selection stage's
    ``selection/selection.json``) or else a "sources" list, or one name per line.

    Raises:
      ConfigError: both or neither given; a name not among ``available``; a malformed JSON list;
        a selection file that cannot be read or that starts like JSON but is not valid JSON.
    """
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    names = d.get("sources") or []
    if isinstance(names, str) and names.lstrip().startswith("["):
        try:
            names = json.loads(names)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config.finetune.sources: {names!r} starts like a JSON list but is "
                              f"not one ({e})") from None
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise ConfigError("config.finetune.sources: a JSON value must be a list of names")
    elif isinstance(names, str):
        names = list(as_names(names))
    path = d.get("selection_file") or ""
    if path:
        if names:
            raise ConfigError("config.finetune: give sources or selection_file, not both")
        names = _selection_file_names(path)
    names = list(names)
    if not names:
        raise ConfigError("config.finetune names no sources (set finetune.sources=a,b or "
                          "finetune.selection_file)")
    unknown = [s for s in names if s not in available]
    if unknown:
        hint = ""
        if not d.get("groups_file") and any(re.fullmatch(r"c\d{2,}", s) for s in unknown):
            hint = (" (clusters of a pipeline run are units of its groups record: set "
                    "finetune.groups_file=<workdir>/groups/groups.json)")
        raise ConfigError(f"config.finetune: unknown sources {unknown}; available: "
                          f"{list(available)}{hint}")
    return names


SELECTION_FILE_FORMS = ("a JSON object with a 'selected' (or 'sources') list of names, as the "
                        "selection stage's selection/selection.json, a JSON list of names, or "
                        "one name per line")


def _selection_file_names(path: str) -> list[str]:
    """The names ``config.finetune.selection_file`` holds (:data:`SELECTION_FILE_FORMS`); a text
    that starts like JSON (``{`` or ``[``) must be valid JSON, never read as names per line."""
    where = f"config.finetune.selection_file={path}"
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else (
            getattr(e, "strerror", None) or str(e))
        raise ConfigError(f"{where}: {reason}; expected {SELECTION_FILE_FORMS}") from None
    if not text.lstrip().startswith(("{", "[")):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e}); expected {SELECTION_FILE_FORMS}") from None
    if isinstance(raw, Mapping):
        if "selected" not in raw and "sources" not in raw:
            raise ConfigError(f"{where}: a JSON object needs a 'selected' or 'sources' list of "
                              "source names")
        raw = raw["selected" if "selected" in raw else "sources"]
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise ConfigError(f"{where}: expected {SELECTION_FILE_FORMS}")
    return raw


def finetune_selection(config: Any, data) -> tuple[Units | None, list[str]]:
    """The units record ``config.finetune.groups_file`` names (None without one) and the units
    (sources, or clusters of that record) ``config.finetune`` selects (:func:`finetune_sources`).

    Raises:
      ConfigError: a groups file that cannot be read, or what :func:`finetune_sources` refuses.
    """
    groups_file = config.finetune.get("groups_file", "") or ""
    units = None
    if groups_file:  # names are units of a groups record: clusters of samples, or sources
        try:
            units = Units.from_file(groups_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"config.finetune.groups_file={groups_file}: {e}") from None
    return units, finetune_sources(config.finetune, units.names if units else data.sources)


def _finished_run(model, run_dir: str, total: int) -> TrainResult | None:
    """The fine-tune in ``run_dir`` if it finished all ``total`` steps: its recorded metrics and
    its last checkpoint restored into ``model``; None when it has not (it then resumes)."""
    done, ckpt = os.path.join(run_dir, rundir.SOURCES_FILE), os.path.join(run_dir, rundir.CKPT_DIR)
    if not (os.path.isfile(done) and os.path.isdir(ckpt)):
        return None
    mngr = ckpt_lib.make_manager(ckpt, read_only=True, async_save=False)
    try:
        step = ckpt_lib.resolve_step(mngr, "latest")
    finally:
        mngr.close()
    if step < total:
        return None
    model, _ = ckpt_lib.restore_params(model, ckpt, step)
    return TrainResult(model=model, step=step, metrics=read_json(done)["metrics"], best_step=None,
                       workdir=run_dir)


def finetune(config: Any, workdir: str) -> TrainResult:
    """Final stage: fine-tune the *base* model (fresh adapters) on the selected sources.

    Trains on the train splits of ``config.finetune.sources`` (with ``finetune.groups_file``,
    a groups record of the pipeline: on the train samples of the units named, clusters or
    sources), validates on the target's validation split (the selected sources' when there is
    no target), evaluates the target's test
    split at the end (``test_*`` metrics, also in ``metrics.jsonl``). Output: ``<workdir>/
    finetune/<name>/`` with ``name`` = ``config.finetune.name`` or
    :func:`finetune_run_name` of the sources. A run of that name made with other settings is
    refused (or retrained with ``pipeline.on_config_change=rerun``); one that finished with the
    same settings and data is returned as recorded, without training or evaluating again.
    """
    cfg = TrainConfig.from_config(config.train, config.mesh)
    initialize_distributed(cfg.distributed)
    describe_devices()
    spec = ModelSpec.from_config(config.model)
    data = load_data(config.data)
    units, selected = finetune_selection(config, data)
    train_examples = (units.examples(data, "train", selected) if units
                      else data.examples("train", selected))
    name = config.finetune.name or finetune_run_name(selected)
    if name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"config.finetune.name={name!r} must be one directory name under "
                         f"{workdir}/finetune (no '/', not '.' or '..')")
    run_dir = rundir.finetune_dir(workdir, name)
    # Before anything is loaded or written: a run made with other settings is refused by name
    # (or deleted with pipeline.on_config_change = "rerun"), never silently resumed or returned.
    mode = str((config.get("pipeline") or {}).get("on_config_change", "error") or "error")
    status = check_finetune_run(run_dir, finetune_run_values(
        config, workdir, selected, [e["example_id"] for e in train_examples]), mode)
    model, tokenizer = load_model(spec, lora_from_config(config.lora))
    total = cfg.total_steps(num_batches(len(train_examples), cfg.batch_size))
    reused = _finished_run(model, run_dir, total) if status == "same" else None
    if reused is not None:  # nothing is trained, evaluated or appended again
        print(f"[jaxgrad] finetune {name}: reused {run_dir} (trained with these settings and "
              "data; --config.pipeline.on_config_change=rerun trains it again)", flush=True)
        return reused
    save_config(config, run_dir)
    trained_on = {e["source"] for e in train_examples}
    eval_sources = [data.target] if data.target else [s for s in data.sources if s in trained_on]
    extract = data.extract_answer if data.answer_format else None
    result = fit(model, tokenizer, train_examples, cfg, run_dir,
                 val_examples=data.examples("validation", eval_sources), sources=data.sources,
                 extract_answer=extract)
    if data.target and data.n("test", data.target) > 0:  # data.files.test = 0: no test split
        test = make_evaluator(result.model, tokenizer, data.target_examples("test"), cfg,
                              sources=data.sources, extract_answer=extract, prefix="test")
        mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.model)
        test_metrics = test(result.model, mesh)
        test_metrics.update(choice_metrics(result.model, tokenizer, data, cfg, prefix="test"))
        MetricsLog(os.path.join(run_dir, rundir.METRICS_FILE)).write({"step": result.step, **test_metrics})
        result.metrics.update(test_metrics)
    save_adapter(result.model, run_dir, base_model_name_or_path=spec.name_or_path or None)
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, rundir.SOURCES_FILE), "w") as f:
            json.dump({"sources": selected, "n_train": len(train_examples),
                       "metrics": result.metrics}, f, indent=1)
    barrier(f"finetune/{name}")  # the other processes read sources.json next
    return result


# ------------------------------------------------------------------------------------------------
# The record of each fine-tune (run.json)

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
              if k.split(".", 1)[0] in RUN_SECTIONS and not excluded(k, flat)}
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
               if k.split(".", 1)[0] in RUN_SECTIONS and not excluded(k, flat)}
        old.update({k: v for k, v in values.items() if k not in old and
                    (k.startswith("inputs.") or k.startswith("finetune."))})
    status = "new" if not os.path.isdir(run_dir) else "same"
    if old is not None:
        changes = config_changes(old, dict(values))
        if changes and mode == "error":
            lines = [f"jaxgrad finetune: {run_dir} holds a fine-tune made with other settings; "
                     "it cannot be reused or resumed.", "Changed (old → new):"]
            lines += [f"  {k}: {format_value(a)} → {format_value(b)}" for k, a, b in changes[:20]]
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
                  + "; ".join(f"{k}: {format_value(a)} → {format_value(b)}" for k, a, b in changes[:5])
                  + "); on_config_change='rerun': deleted it, training again", flush=True)
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_json(path, {"version": RECORDS_VERSION, "values": dict(sorted(values.items()))})
    barrier(f"finetune/recorded/{os.path.basename(run_dir)}")  # nobody trains in it before
    return status


# ------------------------------------------------------------------------------------------------
# The stage: the selection and the baselines


def stage_finetune(config, workdir: str) -> dict:
    """Final step: fine-tune the base model on the selection and on each baseline; test metrics.

    Each run of ``pipeline.finetune_runs`` is trained once (a run on exactly the units of one
    already trained is recorded ``same_as`` it) and resumes where an interrupted one stopped.

    Args:
      config: the run config; workdir: the run directory (``selection/selection.json`` written).

    Returns:
      ``{run name: its finetune/<name>/sources.json record}``; with ``"stopped_early": True``
      (and the unfinished run's ``{"step": ...}``) when training stopped before its last step.

    Raises:
      FileNotFoundError: no selection file. KeyError: a run that is not in the selection's
        runs (``selected`` and ``baselines``).
    """
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


def finetune_runs_done(config, workdir: str) -> bool:
    """Every run of ``pipeline.finetune_runs`` has finished (one added later has not)."""
    return all(os.path.isfile(os.path.join(rundir.finetune_dir(workdir, name), rundir.SOURCES_FILE))
               for name in as_names(config.pipeline.finetune_runs) or ())
