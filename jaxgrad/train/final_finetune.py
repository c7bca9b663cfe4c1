"""The final fine-tune: the *base* model with fresh adapters, trained on the selected sources
(or units of a groups record), validated and tested on the target.

It belongs to the pipeline level (plan §2.1: it reads the selection's output and the run records
of :mod:`jaxgrad.fingerprint`), and moves there with the ``pipeline/`` package; it is a module of
its own here so that the rest of :mod:`jaxgrad.train` imports nothing above it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping, Sequence

import jax

from jaxgrad import rundir
from jaxgrad.common import sharding as sharding_lib
from jaxgrad.common.distributed import barrier, describe_devices, initialize_distributed
from jaxgrad.common.checks import as_names
from jaxgrad.common.jsonio import read_json
from jaxgrad.config import ModelSpec, TrainConfig
from jaxgrad.data.batching import num_batches
from jaxgrad.data.sources import load_data
from jaxgrad.fingerprint import check_finetune_run, finetune_run_values
from jaxgrad.groups.units import Units
from jaxgrad.models.loading import load_model, lora_from_config
from jaxgrad.train import checkpoint as ckpt_lib
from jaxgrad.train.evaluate import choice_metrics, make_evaluator
from jaxgrad.train.loop import MetricsLog, TrainResult, fit, save_adapter
from jaxgrad.train.stage import save_config


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
      ValueError: both or neither given; a name not among ``available``; a malformed JSON list.
    """
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    names = d.get("sources") or []
    if isinstance(names, str) and names.lstrip().startswith("["):
        try:
            names = json.loads(names)
        except json.JSONDecodeError as e:
            raise ValueError(f"config.finetune.sources: {names!r} starts like a JSON list but is "
                             f"not one ({e})") from None
        if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
            raise ValueError("config.finetune.sources: a JSON value must be a list of names")
    elif isinstance(names, str):
        names = list(as_names(names))
    path = d.get("selection_file") or ""
    if path:
        if names:
            raise ValueError("config.finetune: give sources or selection_file, not both")
        with open(path) as f:
            text = f.read()
        try:
            raw = json.loads(text)
            if isinstance(raw, Mapping):
                key = "selected" if "selected" in raw else "sources"
                if key not in raw:
                    raise ValueError(f"config.finetune.selection_file {path}: a JSON object needs "
                                     "a 'selected' or 'sources' list of source names")
                names = raw[key]
            else:
                names = raw
        except json.JSONDecodeError:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    names = list(names)
    if not names:
        raise ValueError("config.finetune names no sources (set finetune.sources=a,b or "
                         "finetune.selection_file)")
    unknown = [s for s in names if s not in available]
    if unknown:
        hint = ""
        if not d.get("groups_file") and any(re.fullmatch(r"c\d{2,}", s) for s in unknown):
            hint = (" (clusters of a pipeline run are units of its groups record: set "
                    "finetune.groups_file=<workdir>/groups/groups.json)")
        raise ValueError(f"config.finetune: unknown sources {unknown}; available: "
                         f"{list(available)}{hint}")
    return names


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
    groups_file = config.finetune.get("groups_file", "") or ""
    if groups_file:  # names are units of a groups record: clusters of samples, or sources
        units = Units.from_file(groups_file)
    else:
        units = None
    selected = finetune_sources(config.finetune, units.names if units else data.sources)
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
