"""The run directory: where each stage of the pipeline puts its artefacts, and the config as the
stages read it (:func:`resolved_config`).

Every path below is relative to the run directory (``workdir``) unless a function takes it; the
names are what run directories written by earlier versions hold, so they never change::

    base/                    the tiny pretrained base (base.pretrain; model.safetensors, pretrain.json)
    base_run/                its pretraining run
    meta_train/              θ*: ckpt/, metrics.jsonl, config.json, done.json
    gradients/train|target/  the gradient stores (manifest.json, shards)
    groups/groups.json       the units selected among (groups stage)
    estimates/estimates.csv  the subsets' estimates
    selection/selection.json the selection and its baselines
    finetune/<name>/         each final fine-tune (sources.json, run.json, metrics.jsonl, ...)
    fidelity/                fidelity.json, settings.json, subset_<i>/truth.npz
    report.md, scores.png, fidelity.png, clusters.png
    stages.json, input_hashes.json, data_splits.json, timings.jsonl
"""

from __future__ import annotations

import contextlib
import copy
import os

# Files any training run (meta-training, a final fine-tune, the base) writes in its directory.
CKPT_DIR = "ckpt"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.json"

# Stage directories and files.
BASE_DIR = "base"
BASE_MODEL_FILE = os.path.join(BASE_DIR, "model.safetensors")
PRETRAIN_FILE = os.path.join(BASE_DIR, "pretrain.json")
BASE_RUN_DIR = "base_run"
META_TRAIN_DIR = "meta_train"
META_TRAIN_CKPT = os.path.join(META_TRAIN_DIR, CKPT_DIR)
META_TRAIN_DONE = os.path.join(META_TRAIN_DIR, "done.json")
META_TRAIN_METRICS = os.path.join(META_TRAIN_DIR, METRICS_FILE)
GRADIENTS_DIR = "gradients"
MANIFEST_FILE = "manifest.json"  # of a gradient store
GROUPS_DIR = "groups"
GROUPS_FILE = os.path.join(GROUPS_DIR, "groups.json")
ESTIMATES_DIR = "estimates"
ESTIMATES_FILE = os.path.join(ESTIMATES_DIR, "estimates.csv")
LEGACY_ESTIMATES_SETTINGS = os.path.join(ESTIMATES_DIR, "settings.json")  # before stages.json
SELECTION_DIR = "selection"
SELECTION_FILE = os.path.join(SELECTION_DIR, "selection.json")
FINETUNE_DIR = "finetune"
SOURCES_FILE = "sources.json"  # in finetune/<name>/: what it trained on and its metrics
RUN_FILE = "run.json"  # in finetune/<name>/: the settings it was trained with
FIDELITY_DIR = "fidelity"
FIDELITY_FILE = os.path.join(FIDELITY_DIR, "fidelity.json")
FIDELITY_SETTINGS_FILE = "settings.json"  # in fidelity/
TRUTH_FILE = "truth.npz"  # in fidelity/subset_<i>/
REPORT_FILE = "report.md"
SCORES_PLOT = "scores.png"
FIDELITY_PLOT = "fidelity.png"
CLUSTERS_PLOT = "clusters.png"
RECORDS_FILE = "stages.json"
HASHES_FILE = "input_hashes.json"
SPLITS_FILE = "data_splits.json"
TIMINGS_FILE = "timings.jsonl"

# Artefacts of each stage: their existence means the stage ran (fully or in part); "rerun"
# deletes them.
STAGE_ARTEFACTS: dict[str, tuple[str, ...]] = {
    "base": (BASE_DIR, BASE_RUN_DIR),
    "meta_train": (META_TRAIN_DIR,),
    "gradients": (GRADIENTS_DIR,),
    "groups": (GROUPS_DIR,),
    "estimates": (ESTIMATES_DIR,),
    "selection": (SELECTION_DIR,),
    "finetune": (FINETUNE_DIR,),
    "fidelity": (FIDELITY_DIR,),
    "report": (REPORT_FILE, SCORES_PLOT, FIDELITY_PLOT, CLUSTERS_PLOT),
}


def gradients_dir(workdir: str, name: str) -> str:
    """The gradient store ``name`` ("train" or "target")."""
    return os.path.join(workdir, GRADIENTS_DIR, name)


def finetune_dir(workdir: str, name: str) -> str:
    """The final fine-tune ``name`` ("selection", "all", ... or a ``finetune.name``)."""
    return os.path.join(workdir, FINETUNE_DIR, name)


def fidelity_subset_dir(workdir: str, subset: int) -> str:
    """The fidelity stage's fine-tune of the estimates table's subset ``subset``."""
    return os.path.join(workdir, FIDELITY_DIR, f"subset_{int(subset)}")


def resolved_config(config, workdir: str):
    """The config with ``model.name_or_path`` pointing at the pretrained base when one is built.

    Stage fingerprints are taken from the config as given: these two keys are left out of them
    when ``base.pretrain`` is on (``jaxgrad.pipeline.fingerprint``), so a run directory can be moved.
    """
    if config.get("base") is not None and config.base.pretrain:
        config = copy.deepcopy(config)
        with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
            config.model.name_or_path = os.path.join(workdir, BASE_DIR)
            config.model.tokenizer = ""
    return config
