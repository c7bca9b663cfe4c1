"""Helpers for the tests that run the tiny pipeline or read its run directory (the session
fixture ``run_dir`` of tests/conftest.py): the stage records and file times of a run directory,
the selection stage rerun under other settings with the surrogate that scores subsets, greedy
forward selection by hand, and a pipeline config over sources with awkward names (issue 12,
kind 9)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from configs import demo
from helpers import fixture
from jaxgrad.config import default_config
from jaxgrad.data.sources import load_data
from jaxgrad.estimate.scorer import SurrogateScorer
from jaxgrad.pipeline import run_pipeline
from jaxgrad.rundir import resolved_config

UP_TO_SELECTION = ["base", "meta_train", "gradients", "estimates", "selection"]


def stage_records(workdir):
    """The stage records of a run directory (stages.json)."""
    with open(os.path.join(workdir, "stages.json")) as f:
        return json.load(f)["stages"]


def file_mtimes(workdir):
    """{path relative to ``workdir``: modification time} of every file under it."""
    return {os.path.relpath(os.path.join(d, f), workdir): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(workdir) for f in files}


def rerun_selection(run_dir, tmp_path, **selection):
    """A copy of ``run_dir`` (in tmp_path/run) with its selection stage rerun under the
    ``selection`` settings: (selection.json, the sources, the score of a batch of subset masks
    by the surrogate the stage used, higher is better)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    config = demo.get_config("tiny")
    for key, value in selection.items():
        config.selection[key] = value
    run_pipeline(config, workdir, stages=["selection"], on_config_change="rerun")
    out = json.load(open(os.path.join(workdir, "selection", "selection.json")))
    sources = load_data(config.data).sources
    scorer = SurrogateScorer(resolved_config(config, workdir), workdir, sources)
    return out, sources, lambda rows: -np.asarray(scorer(np.asarray(rows, bool))["loss"])


def greedy_by_hand(score, names, max_size):
    """Greedy forward selection as a plain loop: add the name whose addition scores best while
    it beats the current set, at most ``max_size``; (names in the order added, final score)."""
    current, want = np.zeros(len(names), bool), []
    best = score([current])[0]
    while len(want) < max_size:
        gains = {j: score([current | (np.arange(len(names)) == j)])[0]
                 for j in range(len(names)) if not current[j]}
        j = max(gains, key=gains.get)
        if not gains[j] > best:
            break
        current[j], best = True, gains[j]
        want.append(names[j])
    return want, best


# ---- sources named with the characters a joined list would split on (issue 12, kind 9) --------

NAMES = ["c++", "a,b", "q&a/v2", "x+y", "[draft] |2|"]
TARGET = "x+y"


def names_config(path: str):
    """A small pipeline config (the tiny Llama fixture, alpaca-format data at ``path`` whose
    "skill" column names the sources, ``TARGET`` the target), every stage and final fine-tune on."""
    c = default_config()
    c.model.name_or_path = fixture("tiny-llama")
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.data.kind = "files"
    c.data.files = dict(format="alpaca", path=path, target=TARGET, validation=2, test=2)
    c.train.batch_size = 4
    c.train.max_length = 32
    c.train.num_steps = 2
    c.train.warmup_steps = 0
    c.train.progress = False
    c.train.async_checkpoint = False
    c.gradients.projection_dim = 16
    c.gradients.batch_size = 8
    c.gradients.chunk_size = 4
    c.surrogate.num_subsets = 6
    c.surrogate.subset_size = 2
    c.selection.top = 2
    c.selection.n_boot = 20
    c.pipeline.finetune_steps = 1
    c.pipeline.finetune_runs = ("selection", "random")  # one run name logic for every run
    c.pipeline.fidelity = True
    c.fidelity.num_subsets = 1
    c.fidelity.steps = 1
    return c
