"""The base model's files are inputs of the stages' fingerprints (issue 16, item 1): weights
edited in place under the same config are caught; hashes are cached per file; run directories
recorded before the file hashes existed are adopted, not refused."""

from __future__ import annotations

import os
import shutil

import pytest

from configs import demo
from jaxgrad.pipeline import fingerprint as F
from jaxgrad.pipeline import records as R
from jaxgrad import rundir
from jaxgrad.pipeline import ConfigChangedError

from helpers import fixture


def _config(model_dir):
    config = demo.get_config("tiny")
    config.base.pretrain = False
    config.model.name_or_path = str(model_dir)
    return config


def _ran(workdir, fps, stages=("meta_train", "gradients")):
    """A run directory whose ``stages`` have artefacts recorded under ``fps``."""
    for s in stages:
        os.makedirs(os.path.join(workdir, s), exist_ok=True)
    R.write_records(str(workdir), {s: R.make_record(fps[s], complete=True) for s in stages})


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(fixture("tiny-llama"), d)
    return d


def test_weights_edited_in_place_are_caught(model_dir, tmp_path):
    config, workdir = _config(model_dir), str(tmp_path / "run")
    inputs = F.model_input_digests(config, workdir)
    weights = f"inputs.model.{model_dir}/model.safetensors"
    assert weights in inputs and f"inputs.model.{model_dir}/config.json" in inputs
    fps = F.stage_fingerprints(config, inputs)
    assert weights in fps["meta_train"].config and weights in fps["finetune"].config
    assert weights in fps["gradients"].config  # through meta_train, its input
    _ran(workdir, fps)
    R.reconcile(workdir, fps, ["meta_train", "gradients"])  # unchanged: accepted

    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight, same size
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    new = F.model_input_digests(config, workdir)
    assert new[weights] != inputs[weights]
    with pytest.raises(ConfigChangedError) as info:
        R.reconcile(workdir, F.stage_fingerprints(config, new), ["meta_train", "gradients"])
    assert info.value.stage == "meta_train" and weights in str(info.value), str(info.value)
    assert os.path.isdir(os.path.join(workdir, "meta_train")), "nothing is deleted"


def test_hashes_are_cached_by_size_and_mtime(model_dir, tmp_path, monkeypatch):
    config, workdir = _config(model_dir), str(tmp_path / "run")
    first = F.model_input_digests(config, workdir)
    assert os.path.isfile(os.path.join(workdir, rundir.HASHES_FILE))
    calls = []
    real = F.file_sha256
    monkeypatch.setattr(F, "file_sha256", lambda p: calls.append(p) or real(p))
    assert F.model_input_digests(config, workdir) == first and calls == []
    os.utime(model_dir / "config.json", ns=(1, 1))  # touched: hashed again, same digest
    assert F.model_input_digests(config, workdir) == first
    assert calls == [str(model_dir / "config.json")]


def test_records_from_before_file_hashes_are_adopted(model_dir, tmp_path, caplog):
    config, workdir = _config(model_dir), str(tmp_path / "run")
    _ran(workdir, F.stage_fingerprints(config))  # as recorded by an older jaxgrad
    inputs = F.model_input_digests(config, workdir)
    fps = F.stage_fingerprints(config, inputs)
    with pytest.raises(ConfigChangedError):  # without the adoption rule it would be refused
        R.reconcile(workdir, fps, ["meta_train", "gradients"])
    records = R.reconcile(workdir, fps, ["meta_train", "gradients"],
                          config_only=F.stage_fingerprints(config))
    assert records["meta_train"]["fingerprint"] == fps["meta_train"].fingerprint
    assert records["gradients"]["complete"] is True
    assert R.read_records(workdir)["meta_train"]["fingerprint"] == fps["meta_train"].fingerprint
    assert "file hashes" in caplog.text


def test_no_file_inputs_for_scratch_pretrained_or_hub_models(tmp_path):
    assert F.model_input_digests(demo.get_config("tiny"), str(tmp_path)) == {}  # base.pretrain
    config = demo.get_config("tiny")
    config.base.pretrain = False
    config.model.name_or_path = "HuggingFaceTB/SmolLM2-135M"  # a Hub name: its config key counts
    assert F.model_input_digests(config, str(tmp_path)) == {}
