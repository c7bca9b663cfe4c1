"""jaxgrad.pipeline.records on the tiny pipeline run (the session fixture ``run_dir``): a changed
config is refused naming the key and deleting nothing, or (on_config_change = "rerun")
recomputes the changed stage and what is downstream of it and nothing else; artefacts without a
record count as changed; run directories from before the records are adopted; an interrupted
stage resumes under its fingerprint."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from configs import demo
from helpers.runs import UP_TO_SELECTION, file_mtimes, stage_records
from jaxgrad.pipeline import ConfigChangedError, run_pipeline
from jaxgrad.pipeline.fingerprint import stage_fingerprints
from jaxgrad.pipeline.records import downstream


def test_changed_surrogate_settings_refused(run_dir):
    config = demo.get_config("tiny")
    config.surrogate.C = 1.0
    with pytest.raises(ConfigChangedError, match=r"surrogate\.C: 0\.0001 → 1\.0") as e:
        run_pipeline(config, run_dir, stages=["estimates"])
    assert e.value.stage == "estimates"


def test_changed_meta_train_key_refused_nothing_deleted(run_dir):
    config = demo.get_config("tiny")
    config.train.num_steps = 5
    before = file_mtimes(run_dir)
    with pytest.raises(ConfigChangedError) as e:
        run_pipeline(config, run_dir)
    assert e.value.stage == "meta_train" and e.value.workdir == run_dir
    assert ("train.num_steps", 4, 5) in e.value.changes
    message = str(e.value)
    for part in ("'meta_train'", run_dir, "train.num_steps: 4 → 5", "--workdir",
                 "--on_config_change=rerun", "Nothing was deleted"):
        assert part in message
    # Running a later stage alone checks the stages it reads as well.
    with pytest.raises(ConfigChangedError, match="--stages=meta_train,gradients,estimates") as e:
        run_pipeline(config, run_dir, stages=["estimates"], on_config_change="rerun")
    assert e.value.stage == "meta_train"
    assert file_mtimes(run_dir) == before


def test_rerun_recomputes_changed_stage_and_downstream(run_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    config = demo.get_config("tiny")
    config.train.num_steps = 5
    config.pipeline.on_config_change = "rerun"
    before = file_mtimes(workdir)
    out = run_pipeline(config, workdir, stages=UP_TO_SELECTION)
    after = file_mtimes(workdir)
    assert after["base/model.safetensors"] == before["base/model.safetensors"]  # upstream skipped
    assert out["meta_train"]["step"] == 5
    for path in ("meta_train/done.json", "gradients/train/manifest.json",
                 "estimates/estimates.csv", "selection/selection.json"):
        assert after[path] > before[path], f"{path} was not recomputed"
    # downstream of the change, not among the stages run: deleted (stale), not left behind
    assert not any(os.path.exists(os.path.join(workdir, p))
                   for p in ("finetune", "report.md", "fidelity"))
    records, fingerprints = stage_records(workdir), stage_fingerprints(config)
    assert list(records) == UP_TO_SELECTION
    assert all(records[s]["fingerprint"] == fingerprints[s].fingerprint and records[s]["complete"]
               for s in UP_TO_SELECTION)
    assert records["base"] == stage_records(run_dir)["base"]


def test_rerun_keeps_what_a_change_does_not_reach(run_dir, tmp_path):
    """A change to selection recomputes selection, the final fine-tunes and the report, but keeps
    the fidelity fine-tunes (they read θ*, the gradients and the estimates only)."""
    assert downstream("selection") == ["selection", "finetune", "report"]
    assert downstream("estimates") == ["estimates", "selection", "finetune", "fidelity", "report"]
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    config = demo.get_config("tiny")
    config.selection.top = 0.67
    with pytest.raises(ConfigChangedError, match="Stale with it .*: finetune, report") as e:
        run_pipeline(config, workdir)
    assert "fidelity" not in str(e.value)
    before = file_mtimes(workdir)
    config.pipeline.on_config_change = "rerun"
    run_pipeline(config, workdir)
    after = file_mtimes(workdir)
    assert after["fidelity/fidelity.json"] == before["fidelity/fidelity.json"]
    assert after["selection/selection.json"] > before["selection/selection.json"]
    assert after["finetune/selection/sources.json"] > before["finetune/selection/sources.json"]
    assert len(json.load(open(os.path.join(workdir, "selection", "selection.json")))["selected"]) == 2


def test_unrecorded_fidelity_results_count_as_changed(run_dir, tmp_path):
    """fidelity/ without a stages.json record (made before records, under other defaults) is not
    adopted: the run stops and says so, and deletes nothing."""
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    path = os.path.join(workdir, "stages.json")
    data = json.load(open(path))
    del data["stages"]["fidelity"]
    json.dump(data, open(path, "w"))
    with pytest.raises(ConfigChangedError, match=r"fidelity \(unrecorded\)"):
        run_pipeline(demo.get_config("tiny"), workdir, stages=["fidelity"])
    assert os.path.isfile(os.path.join(workdir, "fidelity", "fidelity.json"))


def test_legacy_workdir_accepted_and_recorded(run_dir, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(run_dir, workdir)
    os.remove(os.path.join(workdir, "stages.json"))
    before = file_mtimes(workdir)
    with caplog.at_level(logging.WARNING, logger="jaxgrad.pipeline"):
        run_pipeline(demo.get_config("tiny"), workdir, stages=UP_TO_SELECTION)
    warned = [r.getMessage() for r in caplog.records if "no recorded config fingerprint" in
              r.getMessage()]
    assert len(warned) == len(UP_TO_SELECTION)
    after = file_mtimes(workdir)
    logs = ("timings.jsonl", "stages.json")
    assert {k: after[k] for k in before if k not in logs} == \
        {k: v for k, v in before.items() if k not in logs}, "a legacy stage was recomputed"
    records = stage_records(workdir)
    assert all(records[s]["legacy"] and records[s]["fingerprint"] == stage_records(run_dir)[s][
        "fingerprint"] for s in UP_TO_SELECTION)
    # An old estimates/settings.json with other surrogate settings is still refused.
    os.remove(os.path.join(workdir, "stages.json"))
    surrogate = demo.get_config("tiny").surrogate.to_dict()
    with open(os.path.join(workdir, "estimates", "settings.json"), "w") as f:
        json.dump({**surrogate, "C": 1.0, "chunk_subsets": 1}, f)
    with pytest.raises(ConfigChangedError, match=r"surrogate\.C: 1\.0 → 0\.0001") as e:
        run_pipeline(demo.get_config("tiny"), workdir, stages=["estimates"])
    assert [c[0] for c in e.value.changes] == ["surrogate.C"]


def test_interrupted_stage_resumes_under_same_fingerprint(run_dir, tmp_path):
    workdir = str(tmp_path / "run")
    for part in ("base", "base_run"):
        shutil.copytree(os.path.join(run_dir, part), os.path.join(workdir, part))
    shutil.copy(os.path.join(run_dir, "stages.json"), workdir)  # later stages: no artefacts
    config = demo.get_config("tiny")
    config.train.stop_after_steps = 2  # "interrupted" after step 2 (excluded from fingerprints)
    out = run_pipeline(config, workdir, stages=["meta_train", "gradients"])
    assert out["stopped_early"] == "meta_train" and "gradients" not in out
    assert not os.path.exists(os.path.join(workdir, "meta_train", "done.json"))
    assert stage_records(workdir)["meta_train"]["complete"] is False
    out = run_pipeline(demo.get_config("tiny"), workdir, stages=["meta_train"])
    assert out["meta_train"]["step"] == 4
    # resumed from the step-2 checkpoint (a fresh start would only checkpoint step 4)
    assert sorted(os.listdir(os.path.join(workdir, "meta_train", "ckpt"))) == ["2", "4"]
    record = stage_records(workdir)["meta_train"]
    assert record["complete"] is True
    assert record["fingerprint"] == stage_records(run_dir)["meta_train"]["fingerprint"]
