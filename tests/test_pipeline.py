"""The whole pipeline on configs/demo.py:tiny: end to end, resume between stages, report vs table."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest

from configs import demo
from jaxgrad.pipeline import ranking_auc, run_pipeline


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Run the first three stages, 'interrupt', then run everything: earlier stages are reused."""
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    config = demo.get_config("tiny")
    first = run_pipeline(config, workdir, stages=["base", "meta_train", "gradients"])
    assert first["gradients"] == {"train": 3 * 32, "target": 8}
    stamp = os.path.getmtime(os.path.join(workdir, "meta_train", "done.json"))
    shards = sorted(os.listdir(os.path.join(workdir, "gradients", "train")))
    out = run_pipeline(config, workdir)
    assert os.path.getmtime(os.path.join(workdir, "meta_train", "done.json")) == stamp, \
        "meta_train ran again although its artefact existed"
    assert sorted(os.listdir(os.path.join(workdir, "gradients", "train"))) == shards
    assert out["timings"]["base"] < 5 and out["timings"]["meta_train"] < 5  # skipped, not rerun
    return workdir


def test_every_artefact_written(run_dir):
    for path in ["base/model.safetensors", "base/tokenizer.json", "meta_train/adapter/adapter_config.json",
                 "gradients/train/manifest.json", "estimates/estimates.csv",
                 "selection/selection.json", "finetune/selection/sources.json",
                 "finetune/all/sources.json", "report.md", "scores.png"]:
        assert os.path.isfile(os.path.join(run_dir, path)), f"missing {path}"


def test_report_scores_agree_with_estimates_table(run_dir):
    with open(os.path.join(run_dir, "estimates", "estimates.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["converged"] == "True" for r in rows)
    selection = json.load(open(os.path.join(run_dir, "selection", "selection.json")))
    report = open(os.path.join(run_dir, "report.md")).read()
    for source in selection["sources"]:
        losses = [float(r["loss"]) for r in rows if source in r["sources"].split("+")]
        expected = -np.mean(losses)  # loss: lower is better, reported negated
        i = selection["sources"].index(source)
        assert selection["scores"][i] == pytest.approx(expected, rel=1e-6)
        line = re.search(rf"\| \d+ \| {source} \| \w+ \| (-?[\d.]+) \|", report)
        assert line, f"{source} missing from the report's selection table"
        assert float(line.group(1)) == pytest.approx(expected, abs=1e-4)
    selected = json.load(open(os.path.join(run_dir, "finetune", "selection", "sources.json")))
    assert selected["sources"] == selection["selected"]
    m = re.search(r"\| selection \| [^|]+ \| ([\d.]+) \|", report)
    assert float(m.group(1)) == pytest.approx(selected["metrics"]["test_loss"], abs=1e-4)


def test_estimates_resume_does_not_recompute(run_dir):
    table = os.path.join(run_dir, "estimates", "estimates.csv")
    before = open(table).read()
    run_pipeline(demo.get_config("tiny"), run_dir, stages=["estimates"])
    assert open(table).read() == before


def test_changed_surrogate_settings_refused(run_dir):
    config = demo.get_config("tiny")
    config.surrogate.C = 1.0
    with pytest.raises(ValueError, match="other surrogate settings"):
        run_pipeline(config, run_dir, stages=["estimates"])


def test_ranking_auc():
    kinds = {"a": "target", "b": "related", "n": "noisy", "u": "unrelated"}
    assert ranking_auc(["a", "b", "n", "u"], kinds) == 1.0
    assert ranking_auc(["n", "u", "a", "b"], kinds) == 0.0
    assert ranking_auc(["a", "n", "b", "u"], kinds) == 0.75
    assert ranking_auc(["a", "b"], kinds) is None


def test_fidelity_against_real_finetuning(run_dir):
    import ml_collections

    from jaxgrad.fidelity import run_fidelity
    from jaxgrad.pipeline import stage_report

    config = demo.get_config("tiny")
    config.fidelity = ml_collections.ConfigDict(dict(num_subsets=2, steps=3, learning_rate=1e-2))
    out = run_fidelity(config, run_dir)
    assert len(out["rows"]) == 2
    for row in out["rows"]:
        # the table's estimate is reproduced by refitting the same subset
        assert row["linearized_loss_refit"] == pytest.approx(row["linearized_loss"], rel=1e-4)
        # f(θ*) + gᵀΔ is first-order close to a forward pass at θ* + Δ (small Δ: scale 0.1)
        assert row["exact_loss"] == pytest.approx(row["linearized_loss"], rel=0.05)
        assert row["true_loss"] > 0 and row["update_ratio"] > 0
    assert out["first_order_error"] < 1e-2
    report = open(stage_report(config, run_dir)).read()
    assert "## Fidelity" in report and os.path.isfile(os.path.join(run_dir, "fidelity.png"))
