"""Checks before the first stage runs: the whole config (every section's keys, option values,
"fraction or count" settings, dtypes, adapter options) and the data's splits against those the
run directory's stages were computed on.

:func:`validate_config` raises one ``ValueError`` listing every problem it finds, before any model
is loaded or any stage starts; :func:`check_data_splits` compares ``data_splits.json`` with the
data as now read (stop, or with ``on_config_change="rerun"`` recompute what used the old data).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
from typing import Sequence

import jax
import numpy as np

from jaxgrad import rundir
from jaxgrad.common import counts
from jaxgrad.common.checks import as_names
from jaxgrad.common.counts import check_fraction_or_count, fraction_or_count
from jaxgrad.common.distributed import barrier
from jaxgrad.common.jsonio import read_json, write_json
from jaxgrad.config import (CHOICES, FINETUNE_RUNS, ConfigError, FidelityConfig, MeshConfig,
                            ModelSpec, TrainConfig, default_config)
from jaxgrad.data.sources import SourcesSpec, load_data
from jaxgrad.data.synthetic import SyntheticSpec
from jaxgrad.pipeline.fingerprint import STAGE_ORDER, ConfigChangedError
from jaxgrad.groups.units import GroupsSpec
from jaxgrad.models.hf_config import resolve_dtype
from jaxgrad.models.hub import FAMILIES, family_classes
from jaxgrad.models.loading import lora_from_config
from jaxgrad.models.lora import LoraConfig
from jaxgrad.pipeline.records import (artefacts_exist, delete_artefacts, downstream, read_records,
                             write_records)
from jaxgrad.train.stage import base_model_config, base_train_config

log = logging.getLogger("jaxgrad.pipeline")


FRACTION_OR_COUNT = counts.SETTINGS  # setting -> (what it counts, whether 0 is allowed)


def validate_config(config, stages: Sequence[str] | None = None):
    """:func:`check_config`, its ``ValueError`` raised as :class:`~jaxgrad.config.ConfigError`
    (a ``ValueError``), which the command-line scripts print as one line with exit status 2.

    Args:
      config: the run config (``ConfigDict``).
      stages: the stages about to run (default: all of them); the typed-section and data
        checks cover what these stages need.

    Returns:
      As :func:`check_config`: the loaded ``MultiSourceData``, or None when no stage needs data.

    Raises:
      ConfigError: every ``ValueError`` of :func:`check_config`. TypeError: as it raises.
    """
    try:
        return check_config(config, stages)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_config(config, stages: Sequence[str] | None = None):
    """Checks, before the first stage, what would otherwise fail only after hours of training.

    * ``model.dtype`` / ``model.param_dtype`` (float32 or bfloat16);
    * the typed configs the stages build (:func:`check_typed_sections`: ``train.learning_rate =
      -1`` is refused here, not after the stages before meta-training);
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
      TypeError / ValueError: naming the setting (``config.selection.top``) and what it
        expects.
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
    check_typed_sections(config, stages)
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
    stages = list(stages or STAGE_ORDER)
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

    Args:
      config: the run config (``ConfigDict``); sections missing from it are skipped.

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
            near = [m for r in bad for m in difflib.get_close_matches(r, FINETUNE_RUNS, n=1)]
            problems.append(f"config.pipeline.finetune_runs: unknown runs {bad}; each one of "
                            f"{FINETUNE_RUNS}" + (f" (did you mean {near}?)" if near else ""))
    if problems:
        raise ValueError("\n".join(problems))


# Whole-number settings that no typed config checks, read with int() inside their stages: the
# lowest value allowed, and the highest where there is one (Projector's k and seed).
INT_SETTINGS: dict[str, tuple[int, int | None]] = {
    "gradients.projection_dim": (1, 2**20), "gradients.projection_seed": (0, 2**64 - 1),
    "gradients.batch_size": (1, None), "gradients.chunk_size": (1, None),
    "gradients.shard_size": (1, None), "surrogate.num_subsets": (1, None),
    "surrogate.chunk_subsets": (1, None), "surrogate.exact_chunk": (1, None),
    "selection.n_boot": (0, None), "pipeline.finetune_steps": (0, None),
    "pipeline.finetune_seed": (-1, None),
}

# How the base's TrainConfig (jaxgrad.train.stage.base_train_config) names the config's keys.
_BASE_KEYS = (("TrainConfig.learning_rate", "config.base.learning_rate"),
              ("TrainConfig.num_steps", "config.base.steps"), ("TrainConfig.seed", "config.base.seed"),
              ("TrainConfig.", "config.train."))


def check_typed_sections(config, stages: Sequence[str] | None = None) -> None:
    """Build the typed configs the stages build from ``config`` (``TrainConfig`` from ``train``
    and ``mesh``, ``LoraConfig``, ``ModelSpec`` and a from-scratch model's family config, with
    ``base.pretrain`` the base's model and ``TrainConfig``, with the fidelity stage
    ``FidelityConfig``) and check :data:`INT_SETTINGS`, so that a value they refuse stops the
    run before the first stage, under the config key's name, instead of inside its stage.

    Raises:
      ValueError: naming the key (``config.train.learning_rate must be >= 0, got -1.0``).
    """
    stages = set(stages or STAGE_ORDER)
    sections = {n: config.get(n) for n in ("train", "lora", "model", "base", "pipeline",
                                          "fidelity")} if hasattr(config, "get") else {}
    if sections.get("train") is not None:
        _built("train", lambda: TrainConfig.from_config(config.train, config.get("mesh")),
               (("TrainConfig.", "config.train."), ("TrainConfig:", "config.train:")))
    if sections.get("lora") is not None:
        _built("lora", lambda: lora_from_config(config.lora),
               (("LoraConfig.", "config.lora."), ("LoraConfig:", "config.lora:")))
    pretrain = bool((sections.get("base") or {}).get("pretrain", False))
    if pretrain and "base" in stages and sections.get("train") is not None:
        _built("base", lambda: base_train_config(config), _BASE_KEYS)
    if sections.get("model") is not None:
        spec = _built("model", lambda: ModelSpec.from_config(config.model))
        scratch = dict(spec.scratch)
        if pretrain and "base" in stages:
            _built("model.scratch", lambda: base_model_config(
                config, int(scratch.get("vocab_size", 1) or 1)))
        elif not spec.name_or_path and scratch and spec.family in FAMILIES and not pretrain:
            _built("model.scratch", lambda: family_classes(spec.family)[0](**scratch))
    if ("fidelity" in stages and sections.get("fidelity") is not None
            and (sections.get("pipeline") or {}).get("fidelity", False)):
        _built("fidelity", lambda: FidelityConfig(**dict(config.fidelity)),
               (("fidelity.", "config.fidelity."),))
    for key, (low, high) in INT_SETTINGS.items():
        section, name = key.split(".")
        node = config.get(section) if hasattr(config, "get") else None
        value = node.get(name) if hasattr(node, "get") else None
        if value is None:
            continue
        whole = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer))
                 and float(value).is_integer())
        if not whole or value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"config.{key} must be a whole number {bounds}, got {value!r}")


def _built(where: str, build, renames=()):
    """``build()``; its TypeError / ValueError (KeyError: a missing key) as a ValueError whose
    message names the config keys (``renames``: the typed config's field names to the config's
    keys), else prefixed with ``config.<where>``."""
    try:
        return build()
    except (TypeError, ValueError, KeyError) as e:
        msg = str(e)
        for old, new in renames:
            if not msg.startswith("config."):
                msg = msg.replace(old, new)
        if not msg.startswith("config."):
            msg = f"config.{where}: {msg}"
        raise ValueError(msg) from None


DATA_STAGES = ("meta_train", "gradients", "groups", "estimates", "selection", "finetune", "fidelity")


def data_splits_record(data) -> dict:
    """What the run's artefacts assume of the data: a sha256 over the example ids of every
    split of every source (ids hash the prompt and completion, so it changes with any text, any
    split assignment, any source), and the split sizes, to show what changed.

    Args:
      data: the ``MultiSourceData`` of the run.

    Returns:
      ``{"digest": sha256 hex str, "sizes": {split: number of examples}}`` for the train,
      validation and test splits (``data_splits.json``).
    """
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

    The config fingerprints (:mod:`jaxgrad.pipeline.fingerprint`) cannot see the data change when the same
    config loads other examples or other splits (an edited file; a jaxgrad version that reads
    text or splits duplicates differently). ``<workdir>/data_splits.json`` records the splits'
    digest; when it differs and data-dependent artefacts exist, ``mode`` "error" raises and
    "rerun" deletes them (meta_train and everything after it) so they are recomputed. A run
    directory without the file (from before it existed) adopts the current data, as it does for
    config records, unless its gradient stores name other examples than the data has.

    Args:
      workdir: the run directory.
      data: the ``MultiSourceData`` the run loads now.
      mode: ``"error"`` or ``"rerun"`` (``--on_config_change``).

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
