"""jaxgrad.pipeline.timings: timings.jsonl marks the runs that reused a stage, and a stage's time is
that of the runs that computed its current artefacts (a resumed or extended stage adds them up)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from configs import demo
from jaxgrad.pipeline import run_pipeline


def test_report_times_the_runs_that_computed_each_stage(run_dir):
    """timings.jsonl marks the second run's base/meta_train/gradients rows as reused; the report
    gives each stage the seconds of the run that computed it, not of the run that skipped it."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "timings.jsonl"))]
    by_stage = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r)
    for stage in ("base", "meta_train", "gradients"):
        first, second = by_stage[stage]
        assert not first["reused"] and second["reused"], (stage, first, second)
        report = open(os.path.join(run_dir, "report.md")).read()
        assert f"| {stage} | {first['seconds']:.1f} |" in report, f"{stage}: not the computing run"
    assert [r["reused"] for r in by_stage["estimates"]] == [False]


def test_a_finetune_run_still_to_do_is_timed(run_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "finetune", "random"))  # e.g. a run added to finetune_runs
    run_pipeline(demo.get_config("tiny"), workdir, stages=["finetune"])
    run_pipeline(demo.get_config("tiny"), workdir, stages=["finetune"])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "timings.jsonl"))]
    assert [r["reused"] for r in rows if r["stage"] == "finetune"][-2:] == [False, True]
    # the report's time of the stage is the first run's plus the added run's, not the last's
    from jaxgrad.pipeline.timings import stage_seconds

    computing = [r for r in rows if r["stage"] == "finetune" and not r["reused"]]
    assert computing[-1]["fresh"] is False
    assert stage_seconds(rows)["finetune"] == (
        pytest.approx(computing[-2]["seconds"] + computing[-1]["seconds"]), 2)


def test_stage_seconds_add_the_runs_that_resumed_or_extended_a_stage():
    """A fine-tune run added later (or a resumed interruption) is not the stage's whole time: the
    report adds the seconds of the runs that computed the current artefacts (new-user trial of
    issue 16: after adding a run, the table showed only the new run's seconds)."""
    from jaxgrad.pipeline.timings import stage_seconds

    rows = [
        {"stage": "finetune", "seconds": 60.0, "reused": False, "fingerprint": "a", "fresh": True},
        {"stage": "report", "seconds": 1.0, "reused": False, "fingerprint": "r", "fresh": True},
        {"stage": "finetune", "seconds": 0.1, "reused": True, "fingerprint": "a", "fresh": False},
        {"stage": "finetune", "seconds": 20.0, "reused": False, "fingerprint": "a", "fresh": False},
    ]
    assert stage_seconds(rows)["finetune"] == (80.0, 2)
    # recomputed under another config (artefacts deleted first): the count starts again
    rerun = {"stage": "finetune", "seconds": 50.0, "reused": False, "fingerprint": "b",
             "fresh": True}
    assert stage_seconds(rows + [rerun])["finetune"] == (50.0, 1)
    # another fingerprint without a fresh start still starts again
    assert stage_seconds(rows + [{**rerun, "fresh": False}])["finetune"] == (50.0, 1)
    # rows from before "fresh" was recorded: the last computing run, as before
    old = [{"stage": "estimates", "seconds": 5.0}, {"stage": "estimates", "seconds": 7.0}]
    assert stage_seconds(old) == {"estimates": (7.0, 1)}


def test_an_interrupted_stage_keeps_its_time_for_the_report(tmp_path, monkeypatch):
    """run_pipeline writes a timings.jsonl row for a stage stopped by Ctrl-C (its seconds, not
    reused, ``fresh`` and the fingerprint as a finished stage's row has them), so the report's
    Stages table adds them to the resumed run's: "(in 2 runs)"."""
    import time

    from configs import demo
    from jaxgrad import rundir
    from jaxgrad.pipeline import run as run_mod
    from jaxgrad.pipeline.timings import stage_seconds

    def interrupted_base(config, workdir):  # started writing its artefact, then Ctrl-C
        os.makedirs(os.path.join(workdir, rundir.BASE_DIR), exist_ok=True)
        time.sleep(0.3)
        raise KeyboardInterrupt

    def resumed_base(config, workdir):
        time.sleep(0.2)
        with open(os.path.join(workdir, rundir.BASE_MODEL_FILE), "w") as f:
            f.write("weights")
        return os.path.join(workdir, rundir.BASE_DIR)

    config, workdir = demo.get_config("tiny"), str(tmp_path / "run")
    monkeypatch.setattr(run_mod, "stage_base", interrupted_base)
    with pytest.raises(KeyboardInterrupt):
        run_mod.run_pipeline(config, workdir, ["base"])
    monkeypatch.setattr(run_mod, "stage_base", resumed_base)
    run_mod.run_pipeline(config, workdir, ["base"])
    with open(os.path.join(workdir, rundir.TIMINGS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["stage"], r["reused"], r["fresh"]) for r in rows] == [
        ("base", False, True), ("base", False, False)], rows
    assert rows[0]["fingerprint"] == rows[1]["fingerprint"] is not None
    assert rows[0]["seconds"] >= 0.3
    seconds, runs = stage_seconds(rows)["base"]
    assert runs == 2 and seconds >= 0.5
