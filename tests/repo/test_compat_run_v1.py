"""A run directory written before the issue-17 move still loads and is reused (issue 17, item 6).

``tests/fixtures/run_v1/`` is a complete pipeline run directory of ``configs/demo.py:tiny`` (one
final fine-tune, no fidelity; ``tests/fixtures/make_run_v1.py`` wrote it with the code of that
format and says what was left out). A copy is run again with the same config: every stage must be
reused as it is (nothing recomputed, no ``ConfigChangedError``, no record rewritten), the gradient
stores must open with their shapes, θ* must restore from the meta_train checkpoint to exactly the
parameters the stores were computed at, and the fine-tune's ``run.json`` must match.

Nothing is trained: the test reads, compares and writes the report (a few seconds).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil

import numpy as np
import pytest

from helpers import fixture

FIXTURE = fixture("run_v1")
# Files a reused run may change: the stage log (a row per stage run), the report (regenerated) and
# stages.json (the report's record is re-stamped: the fixture has no report.md; compared below).
REWRITTEN = ("timings.jsonl", "report.md", "scores.png", "stages.json")


def _fixture_config():
    """The config the fixture was written with (``make_run_v1.fixture_config``)."""
    spec = importlib.util.spec_from_file_location(
        "make_run_v1", os.path.join(os.path.dirname(FIXTURE), "make_run_v1.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fixture_config()


def _digests(workdir: str) -> dict[str, str]:
    out = {}
    for parent, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _read(workdir: str, rel: str):
    with open(os.path.join(workdir, rel)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    """The fixture copied elsewhere and run again: (workdir, result, printed lines, warnings,
    file digests before)."""
    from jaxgrad.pipeline import run_pipeline

    assert os.path.isfile(os.path.join(FIXTURE, "stages.json")), \
        f"{FIXTURE} is missing (tests/fixtures/make_run_v1.py writes it)"
    workdir = str(tmp_path_factory.mktemp("compat") / "run_v1")
    shutil.copytree(FIXTURE, workdir)
    before = _digests(workdir)
    printed = io.StringIO()
    handler = logging.Handler(logging.WARNING)
    warnings: list[str] = []
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("jaxgrad.pipeline")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(printed):
            out = run_pipeline(_fixture_config(), workdir)  # ConfigChangedError fails the test
    finally:
        logger.removeHandler(handler)
    return workdir, out, printed.getvalue().splitlines(), warnings, before


def test_every_stage_reused_nothing_recomputed(rerun):
    from jaxgrad.pipeline.fingerprint import config_changes, stage_fingerprints
    from jaxgrad.pipeline.records import REGENERATED
    from jaxgrad.pipeline import STAGES

    workdir, out, printed, warnings, before = rerun
    config = _fixture_config()
    records = _read(FIXTURE, "stages.json")["stages"]
    ran = [s for s in STAGES if s not in ("groups", "fidelity")]  # both off in this config
    assert list(records) == ran
    assert out["groups"] is None and out["fidelity"] is None
    fps = stage_fingerprints(config)
    for stage in ran:
        rec = records[stage]
        assert rec["complete"] is True, stage
        # The values behind each fingerprint are what today's config gives (names the key)...
        assert config_changes(rec["config"], fps[stage].config) == [], stage
        # ...and so is the fingerprint over them and the inputs' fingerprints.
        assert rec["fingerprint"] == fps[stage].fingerprint, stage
        assert rec["inputs"] == fps[stage].inputs, stage
        if stage in REGENERATED:
            continue
        assert f"[jaxgrad] stage {stage} ... reused" in printed, (stage, printed)
        assert not any(line.startswith(f"[jaxgrad] stage {stage} done in") for line in printed), \
            (stage, printed)
    assert not warnings, warnings  # no adopted legacy stage, no data change, no file-hash upgrade
    with open(os.path.join(workdir, "timings.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    new_rows = rows[-len(ran):]
    assert [r["stage"] for r in new_rows] == ran
    assert all(r["reused"] for r in new_rows if r["stage"] not in REGENERATED), new_rows
    after = _digests(workdir)
    # Nothing recomputed or re-recorded: data_splits.json and every artefact as it was...
    assert {k: v for k, v in after.items() if k not in REWRITTEN} == \
        {k: v for k, v in before.items() if k not in REWRITTEN}
    # ...and every record but the report's time stamp.
    rerecorded = _read(workdir, "stages.json")
    assert rerecorded["version"] == _read(FIXTURE, "stages.json")["version"] == 1
    for stage in ran:
        new, old = dict(rerecorded["stages"][stage]), dict(records[stage])
        if stage in REGENERATED:
            new.pop("updated"), old.pop("updated")
        assert new == old, stage
    assert os.path.isfile(os.path.join(workdir, "report.md"))
    assert out["meta_train"]["step"] == 4
    assert out["gradients"] == {"train": 96, "target": 8}
    assert out["finetune"]["selection"]["sources"] == _read(workdir, "selection/selection.json")[
        "selected"]


def test_gradient_stores_open_and_merge_with_their_shapes(rerun):
    from jaxgrad.data.sources import load_data
    from jaxgrad.gradients.manifest import FORMAT_VERSION
    from jaxgrad.gradients.store import GradientStore

    workdir = rerun[0]
    data = load_data(_fixture_config().data)
    expected = {"train": data.examples("train"),
                "target": data.examples("validation", [data.target])}
    for name, examples in expected.items():
        path = os.path.join(workdir, "gradients", name)
        for store in (GradientStore.open(path), GradientStore.merge(path)):
            assert store.manifest["format_version"] == FORMAT_VERSION == 1
            assert store.complete and store.k == 32 and store.dtype == "float32"
            assert store.num_examples == len(examples) == {"train": 96, "target": 8}[name]
            assert store.example_ids == [e["example_id"] for e in examples]
            assert store.source_ids == [e["source"] for e in examples]
            feats, f = store.feats(), store.f()
            assert feats.shape == (len(examples), 32) and f.shape == (len(examples),)
            assert np.isfinite(feats).all() and np.isfinite(f).all() and np.abs(feats).max() > 0


def test_theta_star_restores_to_the_parameters_the_stores_were_computed_at(rerun):
    from jaxgrad.gradients.compute import params_fingerprint
    from jaxgrad.gradients.per_sample import num_trainable
    from jaxgrad.models.lora import trainable_state
    from jaxgrad.train.checkpoint import restore_params
    from jaxgrad.rundir import resolved_config
    from jaxgrad.gradients.store import GradientStore
    from jaxgrad.config import ModelSpec
    from jaxgrad.models.loading import load_model, lora_from_config

    workdir = rerun[0]
    config = resolved_config(_fixture_config(), workdir)
    assert config.model.name_or_path == os.path.join(workdir, "base")
    model, _ = load_model(ModelSpec.from_config(config.model), lora_from_config(config.lora))
    theta0 = params_fingerprint(trainable_state(model))
    model, meta = restore_params(model, os.path.join(workdir, "meta_train", "ckpt"), "latest")
    assert meta["step"] == 4 and meta["trainable"] == "lora"
    theta = params_fingerprint(trainable_state(model))
    assert theta != theta0  # the adapters changed (B starts at zero)
    for name in ("train", "target"):
        manifest = GradientStore.open(os.path.join(workdir, "gradients", name)).manifest
        assert manifest["checkpoint"] == {"fingerprint": theta}, name
        assert manifest["projector"]["dim"] == num_trainable(model) == 18496


def test_finetune_run_record_matches(rerun):
    from jaxgrad.pipeline.finetune import check_finetune_run, finetune_run_values
    from jaxgrad.rundir import resolved_config
    from jaxgrad.data.sources import load_data

    workdir = rerun[0]
    config = resolved_config(_fixture_config(), workdir)
    selected = _read(workdir, "selection/selection.json")["selected"]
    run_dir = os.path.join(workdir, "finetune", "selection")
    cfg = copy.deepcopy(config)  # what the finetune stage changes (jaxgrad.pipeline.stage_finetune)
    if int(config.pipeline.finetune_steps) > 0:
        cfg.train.num_steps = int(config.pipeline.finetune_steps)
    data = load_data(cfg.data)
    train_ids = [e["example_id"] for e in data.examples("train", selected)]
    values = finetune_run_values(cfg, workdir, selected, train_ids)
    recorded = _read(run_dir, "run.json")["values"]
    assert recorded == json.loads(json.dumps(values)), \
        {k: (recorded.get(k), values.get(k)) for k in set(recorded) | set(values)
         if recorded.get(k) != values.get(k)}
    assert check_finetune_run(run_dir, values, "error") == "same"
    assert _read(run_dir, "sources.json")["sources"] == selected
