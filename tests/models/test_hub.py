"""jaxgrad.models.hub: loading and saving checkpoints. The committed Llama / Qwen2 / T5 / Flan-T5
fixtures against torch logits from Hugging Face, bfloat16 compute, sharded safetensors, the
tokenizer, errors that name what is wrong, a save_pretrained round trip, and no deprecation
warnings from jaxgrad (issue 12, kind 11).

The references in tests/fixtures/*/reference.npz come from tests/fixtures/make_fixtures.py
(torch + transformers + peft on tiny random checkpoints, right-padded batches). Positions that are
padding are excluded from comparisons: there the two implementations may legitimately differ.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import REPO, fixture
from helpers.models import ALL, ATOL, copy_fixture, edit_config, max_err, reference, run
from jaxgrad.models import LoraConfig, load_pretrained


@pytest.mark.parametrize("name", ALL)
def test_logits_match_torch(name):
    model, _ = load_pretrained(fixture(name))
    ref = reference(name)
    ours, mask = run(model, ref)
    assert ours.shape == ref["logits"].shape
    err = max_err(ours, ref["logits"], mask)
    assert err < ATOL, f"{name}: max |ours - torch| on real tokens = {err:.2e} >= {ATOL}"


def test_bfloat16_compute_close_to_float32():
    model, _ = load_pretrained(fixture("tiny-llama"), dtype="bfloat16")
    ref = reference("tiny-llama")
    ours, mask = run(model, ref)
    assert ours.dtype == np.float32
    err = max_err(ours, ref["logits"], mask)
    scale = float(np.abs(ref["logits"]).max())
    assert err < 0.05 * scale, f"bfloat16 logits off by {err:.3f} (logit scale {scale:.3f})"


def test_sharded_safetensors_index(tmp_path):
    d = copy_fixture("tiny-qwen2", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for fname, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(d / fname))
    os.remove(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    model, _ = load_pretrained(str(d))
    ref = reference("tiny-qwen2")
    ours, mask = run(model, ref)
    assert max_err(ours, ref["logits"], mask) < ATOL


def test_tokenizer_loaded_when_present():
    _, tok = load_pretrained(fixture("tiny-llama"))
    assert tok is not None and tok.decode(tok.encode("12+3=", add_special_tokens=False)) == "12+3="
    _, none = load_pretrained(fixture("tiny-qwen2"))
    assert none is None


def test_missing_directory_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))


def test_unsupported_architecture_error(tmp_path):
    d = copy_fixture("tiny-qwen2", tmp_path)
    edit_config(d, model_type="bloom", architectures=["BloomForCausalLM"])
    with pytest.raises(ValueError, match=r"unsupported architecture.*bloom.*llama, mistral, qwen2, t5, "
                                         r"gpt2, gpt_neox, gemma3_text"):
        load_pretrained(str(d))


def test_missing_unexpected_misshaped_tensors_listed(tmp_path):
    d = copy_fixture("tiny-llama", tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.norm.weight"] = np.ones((31,), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        load_pretrained(str(d))
    msg = str(info.value)
    assert "missing tensors: ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected tensors: ['model.layers.0.self_attn.extra.weight']" in msg
    assert "model.norm.weight: checkpoint (31,) vs model (32,)" in msg


def test_no_weights_error(tmp_path):
    d = copy_fixture("tiny-qwen2", tmp_path)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="convert them to safetensors"):
        load_pretrained(str(d))


def test_hub_name_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_pretrained("some-org/some-model")


def test_save_pretrained_roundtrip(tmp_path):
    from jaxgrad.models import save_pretrained

    model, _ = load_pretrained(fixture("tiny-qwen2"), lora=LoraConfig(rank=2))
    hf = json.loads(open(os.path.join(fixture("tiny-qwen2"), "config.json")).read())
    save_pretrained(model, tmp_path / "out", hf)
    again, _ = load_pretrained(str(tmp_path / "out"))
    ref = reference("tiny-qwen2")
    a, mask = run(again, ref)
    assert max_err(a, ref["logits"], mask) < ATOL


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-t5", "tiny-flan-t5"])
def test_loading_emits_no_deprecation_warnings_from_jaxgrad(name, tmp_path):
    from jaxgrad.models import save_pretrained

    package = os.path.join(REPO, "jaxgrad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_pretrained(fixture(name), with_tokenizer=False, lora=LoraConfig(rank=2))
        save_pretrained(model, tmp_path / "out", json.load(open(os.path.join(fixture(name),
                                                                             "config.json"))))
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and os.path.abspath(w.filename).startswith(package)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
