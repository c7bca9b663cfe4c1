"""jaxgrad.pipeline.fingerprint: each stage's fingerprint of the config keys it reads.

The base model's files are inputs of the stages' fingerprints (issue 16, item 1): weights
edited in place under the same config are caught; hashes are cached per file; run directories
recorded before the file hashes existed are adopted, not refused. Counts and lists of names mean
the same fingerprint however they are typed; the chain of stages, the keys excluded from the
fingerprints (they change no stage's result) and the inert default of finetune_seed."""

from __future__ import annotations

import os
import shutil

import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo
from helpers import REPO, fixture
from helpers.runs import file_mtimes, stage_records
from jaxgrad import rundir
from jaxgrad.pipeline import (STAGES, ConfigChangedError, fingerprint as F, records as R,
                              run_pipeline)
from jaxgrad.pipeline.fingerprint import stage_fingerprints


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


def test_two_and_two_point_zero_have_one_fingerprint():
    from jaxgrad.pipeline.fingerprint import stage_fingerprints

    a, b = demo.get_config("tiny"), demo.get_config("tiny")
    a.selection.top, b.selection.top = 2, 2.0
    assert stage_fingerprints(a)["selection"].fingerprint == \
        stage_fingerprints(b)["selection"].fingerprint


def _from_command_line(*overrides: str):
    argv = ["prog", f"--config={os.path.join(REPO, 'configs', 'demo.py')}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def _fingerprints(config) -> dict[str, str]:
    return {s: f.fingerprint for s, f in stage_fingerprints(config).items()}


@pytest.mark.parametrize("overrides", [
    ("--config.data.synthetic.tasks=add,sub,add_digit",),
    ("--config.data.synthetic.tasks=add, sub, add_digit", "--config.data.synthetic.noisy=add,sort"),
    ("--config.lora.target_modules=q_proj, k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,"
     "lm_head",),
])
def test_the_same_names_typed_on_a_command_line_keep_every_fingerprint(overrides):
    typed = _from_command_line(*overrides)
    assert _fingerprints(typed) == _fingerprints(demo.get_config())


def test_other_names_change_the_fingerprint():
    typed = _from_command_line("--config.data.synthetic.tasks=add,sub")
    changed = [s for s, f in _fingerprints(typed).items()
               if f != _fingerprints(demo.get_config())[s]]
    assert "meta_train" in changed and "base" not in changed, changed


def test_fingerprint_chain_and_exclusions():
    base = stage_fingerprints(demo.get_config("tiny"))
    config = demo.get_config("tiny")
    config.selection.top = 0.67
    changed = stage_fingerprints(config)
    assert [s for s in STAGES if changed[s].fingerprint != base[s].fingerprint] == \
        ["selection", "finetune", "report"]
    config = demo.get_config("tiny")
    config.train.log_every, config.train.progress, config.train.save_every = 1, True, 1
    config.train.stop_after_steps, config.mesh.data = 2, 1
    config.gradients.chunk_size, config.gradients.batch_size = 2, 4
    config.surrogate.chunk_subsets, config.pipeline.finetune_runs = 2, ("selection",)
    assert {s: f.fingerprint for s, f in stage_fingerprints(config).items()} == \
        {s: f.fingerprint for s, f in base.items()}
    config = demo.get_config("tiny")
    config.base.pretrain = False
    config.model.name_or_path = "/some/model"
    no_base = stage_fingerprints(config)
    config.base.steps = 7  # not read without pretraining
    assert stage_fingerprints(config)["meta_train"].fingerprint == no_base["meta_train"].fingerprint
    assert no_base["meta_train"].config["model.name_or_path"] == "/some/model"
    assert "model.name_or_path" not in base["meta_train"].config  # <workdir>/base (resolved)


def test_excluded_keys_do_not_invalidate(run_dir, tmp_path):
    workdir = str(tmp_path / "run")  # a copy: the run appends to the shared run's timings
    shutil.copytree(run_dir, workdir)  # (copy2 keeps the files' times)
    config = demo.get_config("tiny")
    config.train.log_every, config.train.progress, config.train.keep_checkpoints = 1, True, 3
    config.gradients.chunk_size, config.surrogate.chunk_subsets = 4, 2
    records = stage_records(workdir)
    before = {k: v for k, v in file_mtimes(workdir).items()
              if k.split(os.sep)[0] in ("base", "meta_train", "gradients", "estimates",
                                        "selection", "finetune")}
    out = run_pipeline(config, workdir)
    assert out["finetune"]["selection"]["sources"] == out["selection"]["selected"]
    after = file_mtimes(workdir)
    assert {k: after.get(k) for k in before} == before, "an excluded key made a stage recompute"
    assert {s: r["fingerprint"] for s, r in stage_records(workdir).items()} == \
        {s: r["fingerprint"] for s, r in records.items()}


def test_finetune_seed_is_inert_at_its_default():
    """pipeline.finetune_seed = -1 (the default) leaves fingerprints as before the key existed, so
    older run directories still match; another value changes the final fine-tunes only."""
    base = stage_fingerprints(demo.get_config("tiny"))
    config = demo.get_config("tiny")
    del config.pipeline["finetune_seed"]
    assert {s: f.fingerprint for s, f in stage_fingerprints(config).items()} == \
        {s: f.fingerprint for s, f in base.items()}
    config = demo.get_config("tiny")
    config.pipeline.finetune_seed = 3
    changed = stage_fingerprints(config)
    assert [s for s in STAGES if changed[s].fingerprint != base[s].fingerprint] == \
        ["finetune", "report"]
