"""jaxgrad.select.stage on the tiny pipeline run (the session fixture ``run_dir``): the selection
metric, the representation-similarity baseline (also added to selections from before it existed),
forward, ordered and threshold selection against the surrogate by hand, and the ranking AUC."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from configs import demo
from helpers.runs import UP_TO_SELECTION, greedy_by_hand, rerun_selection
from jaxgrad.pipeline import run_pipeline
from jaxgrad.select.stage import ranking_auc


def test_selection_metric_without_values_is_refused(run_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    config = demo.get_config("tiny")  # token_ce outputs: no accuracy column
    config.selection.metric = "accuracy"
    config.pipeline.on_config_change = "rerun"
    with pytest.raises(ValueError, match=r"selection.metric = 'accuracy'.*no 'accuracy' values"):
        run_pipeline(config, workdir, stages=UP_TO_SELECTION)
    config.selection.metric = "acc"
    with pytest.raises(ValueError, match="selection.metric must be one of"):
        run_pipeline(config, workdir, stages=UP_TO_SELECTION)


def test_ranking_auc():
    kinds = {"a": "target", "b": "related", "n": "noisy", "u": "unrelated"}
    assert ranking_auc(["a", "b", "n", "u"], kinds) == 1.0
    assert ranking_auc(["n", "u", "a", "b"], kinds) == 0.0
    assert ranking_auc(["a", "n", "b", "u"], kinds) == 0.75
    assert ranking_auc(["a", "b"], kinds) is None


def test_representation_similarity_baseline(run_dir):
    """repr_sim: the top-k sources (k = the selection's size) by the cosine between each source's
    mean last-layer hidden state at θ* and the target's; it is fine-tuned and reported."""
    from jaxgrad.train.stage import load_theta_star
    from jaxgrad.rundir import resolved_config
    from jaxgrad.select.representations import mean_representations
    from jaxgrad.data.sources import load_data

    sel = json.load(open(os.path.join(run_dir, "selection", "selection.json")))
    config = demo.get_config("tiny")
    data = load_data(config.data)
    model, tok = load_theta_star(resolved_config(config, run_dir), run_dir)
    kw = dict(sources=data.sources, max_length=config.train.max_length)
    target = mean_representations(model, tok, data.examples("validation", [data.target]), **kw)
    t = target.mean(0)
    want = []
    for s in data.sources:
        m = mean_representations(model, tok, data.examples("train", [s]), **kw).mean(0)
        want.append(m @ t / (np.linalg.norm(m) * np.linalg.norm(t)))
    np.testing.assert_allclose(sel["repr_sim_scores"], want, atol=1e-4)
    k = len(sel["selected"])
    top = [data.sources[i] for i in sorted(np.argsort(-np.asarray(want))[:k])]
    assert sel["baselines"]["repr_sim"] == top
    run = json.load(open(os.path.join(run_dir, "finetune", "repr_sim", "sources.json")))
    assert run["sources"] == top
    assert "repr-sim cosine" in open(os.path.join(run_dir, "report.md")).read()


def test_selection_from_before_repr_sim_gains_the_baseline(run_dir, tmp_path):
    """A selection.json written before the repr_sim baseline existed gets it added (same k, the
    rest unchanged) instead of failing the finetune stage."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    path = os.path.join(workdir, "selection", "selection.json")
    new = json.load(open(path))
    old = json.loads(json.dumps(new))
    del old["baselines"]["repr_sim"], old["repr_sim_scores"]
    json.dump(old, open(path, "w"))
    run_pipeline(demo.get_config("tiny"), workdir, stages=["selection"])
    again = json.load(open(path))
    assert again["baselines"] == new["baselines"]
    np.testing.assert_allclose(again["repr_sim_scores"], new["repr_sim_scores"], atol=1e-6)
    assert again["selected"] == new["selected"]


def test_forward_selection_is_greedy_on_the_surrogate(run_dir, tmp_path):
    """selection.method = "forward" against greedy forward selection done by hand."""
    out, sources, score = rerun_selection(run_dir, tmp_path, method="forward", top=3)
    want, best = greedy_by_hand(score, sources, 3)
    assert out["method"] == "forward" and out["stepwise"]["order"] == want
    assert out["selected"] == [s for s in sources if s in want]
    assert out["stepwise"]["path_scores"][-1] == pytest.approx(best, rel=1e-5)
    assert len(out["baselines"]["random"]) == len(out["selected"])


def test_ordered_and_threshold_selection(run_dir, tmp_path):
    out, sources, score = rerun_selection(run_dir, tmp_path / "o", method="ordered")
    order = np.argsort(-np.asarray(out["scores"]), kind="stable")
    current, best, want = np.zeros(len(sources), bool), None, []
    best = score([current])[0]
    for j in order:
        trial = current.copy()
        trial[j] = True
        s = score([trial])[0]
        if s > best:
            current, best = trial, s
            want.append(sources[j])
    assert out["stepwise"]["order"] == want
    scores = np.asarray(out["scores"])
    threshold = float(np.median(scores))
    out, _, _ = rerun_selection(run_dir, tmp_path / "t", method="threshold", threshold=threshold)
    assert out["selected"] == [s for s, v in zip(sources, scores) if v >= threshold]
