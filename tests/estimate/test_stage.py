"""jaxgrad.estimate.stage: the estimates stage's messages, the estimates table's subsets read
back (JSON lists of names, and the rows of run directories from before JSON), and
surrogate.mode = "exact" in a pipeline run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from helpers.runs import UP_TO_SELECTION

from configs import demo
from jaxgrad.estimate import stage
from jaxgrad.estimate.stage import subset_sources
from jaxgrad.pipeline import run_pipeline


def test_repeated_subsets_are_one_line_naming_the_config_keys_not_a_raw_warning(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a UserWarning escaping the stage fails here
        subsets = stage._sample(4, 10, 2, seed=0)  # C(4, 2) = 6 distinct subsets for 10
    assert subsets.shape == (10, 4) and len({r.tobytes() for r in subsets}) == 6
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["[jaxgrad] estimates: only 6 distinct subsets of 2 of 4 sources exist; 4 of "
                   "the 10 repeat (config.surrogate.num_subsets = 10, subset_size = 2 of 4: "
                   "fewer subsets or another size would not repeat any)"], out


def test_enough_distinct_subsets_print_nothing(capsys):
    stage._sample(6, 10, 3, seed=0)
    assert capsys.readouterr().out == ""


def test_exact_mode_scores_the_linearized_metric_by_forward_pass(run_dir, tmp_path):
    """surrogate.mode = "exact": the exact_loss column measures what `loss` linearizes (with
    logit-odds outputs, the logistic loss of the logit-odds, not a cross-entropy; equal to 1e-4 at
    a tiny step, where the token cross-entropy differs by 1e-3) and selection scores sources by it;
    gradients and estimates rerun, θ* does not."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    config = demo.get_config("tiny")
    config.gradients.output_fn = "logit_odds"
    config.surrogate.mode = "exact"
    config.surrogate.scale = 1e-4
    config.pipeline.on_config_change = "rerun"
    out = run_pipeline(config, workdir, stages=UP_TO_SELECTION)
    unchanged = str(tmp_path / "unchanged")  # a second copy: the shared run stays as it is
    shutil.copytree(run_dir, unchanged)
    assert out["meta_train"] == run_pipeline(config, unchanged, stages=["meta_train"])["meta_train"]
    with open(os.path.join(workdir, "estimates", "estimates.csv")) as f:
        rows = list(csv.DictReader(f))
    lin = np.array([float(r["loss"]) for r in rows])
    exact = np.array([float(r["exact_loss"]) for r in rows])
    np.testing.assert_allclose(exact, lin, rtol=1e-4, err_msg="exact_loss must be the metric that "
                               "loss linearizes (logistic loss of the logit-odds here)")
    selection = json.load(open(os.path.join(workdir, "selection", "selection.json")))
    assert selection["metric"] == "exact_loss" and not selection["higher_is_better"]


def test_subset_sources_reads_json_and_legacy_rows():
    assert subset_sources(json.dumps(["a,b", "x+y"])) == ["a,b", "x+y"]
    assert subset_sources("add+copy") == ["add", "copy"]  # run directories from before JSON
    assert subset_sources(["q&a/v2"]) == ["q&a/v2"]
    with pytest.raises(ValueError, match="JSON list of names"):
        subset_sources('[1, 2]')


def _estimates_run(tmp_path, monkeypatch, rows_done: int):
    """stage_estimates of demo.py:tiny (3 sources, subsets of one, 6 subsets: repeats) with
    ``rows_done`` rows already in estimates.csv; the scorer is a stand-in."""
    from configs import demo
    from jaxgrad import rundir
    from jaxgrad.estimate import stage
    from jaxgrad.groups.units import Units

    class Scorer:
        def __init__(self, config, workdir, sources):
            pass

        def __call__(self, rows):
            n = rows.shape[0]
            return {k: np.zeros(n) for k in stage.ESTIMATE_FIELDS[2:]}

    config = demo.get_config("tiny")
    sources = ["add", "copy", "noisy_add"]
    monkeypatch.setattr(stage, "pipeline_units", lambda config, workdir: Units.of_sources(sources))
    monkeypatch.setattr(stage, "SurrogateScorer", Scorer)
    workdir = str(tmp_path)
    if rows_done:
        os.makedirs(os.path.join(workdir, rundir.ESTIMATES_DIR), exist_ok=True)
        with open(os.path.join(workdir, rundir.ESTIMATES_FILE), "w") as f:
            f.write(",".join(stage.ESTIMATE_FIELDS) + "\n")
            for i in range(rows_done):
                f.write(f'{i},"[""add""]",1,True,1,0,0,0,0\n')
    return stage.stage_estimates(config, workdir)


def test_repeated_subsets_note_only_when_the_stage_computes_rows(tmp_path, monkeypatch, capsys):
    _estimates_run(tmp_path / "new", monkeypatch, rows_done=0)
    assert "[jaxgrad] estimates: " in capsys.readouterr().out, "the note is gone altogether"
    _estimates_run(tmp_path / "done", monkeypatch, rows_done=6)  # reused: every row is there
    out = capsys.readouterr().out
    assert "[jaxgrad] estimates:" not in out, f"a reused stage printed {out!r}"
