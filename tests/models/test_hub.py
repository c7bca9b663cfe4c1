"""Our Flax Llama / Qwen2 / T5 / Flan-T5 modules against torch logits from Hugging Face.

The references in tests/fixtures/*/reference.npz come from tests/fixtures/make_fixtures.py
(torch + transformers + peft on tiny random checkpoints, right-padded batches). Positions that are
padding are excluded from comparisons: there the two implementations may legitimately differ.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxgrad.models import (LoraConfig, apply_lora, load_peft_adapter, load_pretrained, lora_state,
                            num_params, save_peft_adapter, shift_right, trainable_summary)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
DECODERS = ["tiny-llama", "tiny-qwen2"]
ENCDECS = ["tiny-t5", "tiny-flan-t5"]
ALL = DECODERS + ENCDECS
ATOL = 1e-4


def fixture(name):
    return os.path.join(FIXTURES, name)


def reference(name):
    return dict(np.load(os.path.join(fixture(name), "reference.npz")))


def run(model, ref):
    """Our logits on the reference inputs, and the mask of positions that are real tokens."""
    if "decoder_input_ids" in ref:
        logits = model(ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"],
                       ref["decoder_attention_mask"])
        return np.asarray(logits), ref["decoder_attention_mask"] > 0
    return np.asarray(model(ref["input_ids"], ref["attention_mask"])), ref["attention_mask"] > 0


def max_err(a, b, mask):
    return float(np.abs(a - b)[mask].max())


@pytest.mark.parametrize("name", ALL)
def test_logits_match_torch(name):
    model, _ = load_pretrained(fixture(name))
    ref = reference(name)
    ours, mask = run(model, ref)
    assert ours.shape == ref["logits"].shape
    err = max_err(ours, ref["logits"], mask)
    assert err < ATOL, f"{name}: max |ours - torch| on real tokens = {err:.2e} >= {ATOL}"


@pytest.mark.parametrize("name", ALL)
def test_lora_with_zero_b_leaves_logits_unchanged(name):
    model, _ = load_pretrained(fixture(name))
    ref = reference(name)
    before, mask = run(model, ref)
    apply_lora(model, LoraConfig(rank=4, alpha=16, seed=3))
    after, _ = run(model, ref)
    np.testing.assert_array_equal(after, before, err_msg="B = 0 must leave the base model's logits unchanged")
    assert all(np.any(np.asarray(v) != 0) for k, v in jax.tree_util.tree_leaves_with_path(lora_state(model))
               if "lora_A" in jax.tree_util.keystr(k)), "lora_A should be randomly initialised"


@pytest.mark.parametrize("name", ALL)
def test_peft_adapter_matches_torch_peft(name):
    """A nonzero adapter trained/saved by peft gives the same logits in our model as in torch."""
    model, _ = load_pretrained(fixture(name))
    load_peft_adapter(model, os.path.join(fixture(name), "peft_adapter"))
    ref = reference(name)
    ours, mask = run(model, ref)
    assert max_err(ref["peft_logits"], ref["logits"], mask) > 1e-2, "fixture adapter should matter"
    err = max_err(ours, ref["peft_logits"], mask)
    assert err < ATOL, f"{name}: with the peft adapter, max |ours - torch+peft| = {err:.2e}"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_peft_export_then_import_is_exact(name, tmp_path):
    model, _ = load_pretrained(fixture(name))
    load_peft_adapter(model, os.path.join(fixture(name), "peft_adapter"))
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=fixture(name))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    original = set(load_file(os.path.join(fixture(name), "peft_adapter", "adapter_model.safetensors")))
    assert keys == original, "exported key names must be PEFT's, identical to peft's own save"
    fresh, _ = load_pretrained(fixture(name))
    load_peft_adapter(fresh, tmp_path / "adapter")
    a = jax.tree_util.tree_leaves(lora_state(model))
    b = jax.tree_util.tree_leaves(lora_state(fresh))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_trainable_parameter_count():
    model, _ = load_pretrained(fixture("tiny-llama"), lora=LoraConfig(rank=4, alpha=8))
    # q: 32->32, k: 32->16, v: 32->16 (2 kv heads of 8) per layer, 2 layers: r*(in+out) each.
    expected = 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 16))
    assert num_params(lora_state(model)) == expected
    summary = trainable_summary(model)
    assert summary["lora_params"] == expected and 0 < summary["lora_fraction"] < 0.1


def test_t5_targets_match_self_and_cross_attention():
    model, _ = load_pretrained(fixture("tiny-t5"), lora=LoraConfig(rank=2))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(lora_state(model))]
    assert any("EncDecAttention" in p for p in paths) and any("SelfAttention" in p for p in paths)
    # q, k, v in 2 encoder self-attn + 2 decoder self-attn + 2 decoder cross-attn, A and B each.
    assert len(paths) == 3 * 6 * 2


def test_shift_right_matches_transformers():
    ref = reference("tiny-t5")
    ours = shift_right(jnp.asarray(ref["labels"]), 0, 0)
    np.testing.assert_array_equal(np.asarray(ours), ref["decoder_input_ids"])


def test_lora_dropout_only_with_rng():
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")  # those of the peft fixture
    model, _ = load_pretrained(fixture("tiny-llama"),
                               lora=LoraConfig(rank=4, dropout=0.5, target_modules=targets))
    load_peft_adapter(model, os.path.join(fixture("tiny-llama"), "peft_adapter"))
    ref = reference("tiny-llama")
    a = np.asarray(model(ref["input_ids"], ref["attention_mask"]))
    b = np.asarray(model(ref["input_ids"], ref["attention_mask"]))
    c = np.asarray(model(ref["input_ids"], ref["attention_mask"], dropout_rng=jax.random.key(0)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4, "dropout with a key must change the adapted output"


def test_bfloat16_compute_close_to_float32():
    model, _ = load_pretrained(fixture("tiny-llama"), dtype="bfloat16")
    ref = reference("tiny-llama")
    ours, mask = run(model, ref)
    assert ours.dtype == np.float32
    err = max_err(ours, ref["logits"], mask)
    scale = float(np.abs(ref["logits"]).max())
    assert err < 0.05 * scale, f"bfloat16 logits off by {err:.3f} (logit scale {scale:.3f})"


def _copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(fixture(name), dst)
    return dst


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_transformers4_rope_scaling_fields_read(tmp_path):
    """`rope_theta` + `rope_scaling` (transformers 4) mean the same as `rope_parameters` (5)."""
    d = _copy_fixture("tiny-llama", tmp_path)
    params = json.loads((d / "config.json").read_text())["rope_parameters"]
    theta = params.pop("rope_theta")
    _edit_config(d, rope_parameters=None, rope_theta=theta, rope_scaling=params)
    model, _ = load_pretrained(str(d))
    ref = reference("tiny-llama")
    ours, mask = run(model, ref)
    assert max_err(ours, ref["logits"], mask) < ATOL


def test_untied_flan_t5_config_from_transformers4(tmp_path):
    """Flan-T5 configs on the Hub say tie_word_embeddings=false and ship lm_head.weight."""
    d = _copy_fixture("tiny-flan-t5", tmp_path)
    _edit_config(d, tie_word_embeddings=False, scale_decoder_outputs=None)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["shared.weight"].copy()
    save_file(tensors, str(d / "model.safetensors"))
    model, _ = load_pretrained(str(d))
    assert model.lm_head is not None
    ref = reference("tiny-flan-t5")
    ours, mask = run(model, ref)
    assert max_err(ours, ref["logits"], mask) < ATOL


def test_sharded_safetensors_index(tmp_path):
    d = _copy_fixture("tiny-qwen2", tmp_path)
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


# ---- errors -------------------------------------------------------------------------------------

def test_missing_directory_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))


def test_unsupported_architecture_error(tmp_path):
    d = _copy_fixture("tiny-qwen2", tmp_path)
    _edit_config(d, model_type="bloom", architectures=["BloomForCausalLM"])
    with pytest.raises(ValueError, match=r"unsupported architecture.*bloom.*llama, mistral, qwen2, t5, "
                                         r"gpt2, gpt_neox, gemma3_text"):
        load_pretrained(str(d))


def test_missing_unexpected_misshaped_tensors_listed(tmp_path):
    d = _copy_fixture("tiny-llama", tmp_path)
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
    d = _copy_fixture("tiny-qwen2", tmp_path)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="convert them to safetensors"):
        load_pretrained(str(d))


def test_hub_name_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_pretrained("some-org/some-model")


def test_unknown_lora_target_error():
    model, _ = load_pretrained(fixture("tiny-t5"))
    with pytest.raises(ValueError, match=r"q_proj.*available names"):
        apply_lora(model, LoraConfig(rank=2, target_modules=("q_proj",)))


def test_import_jaxgrad_is_light():
    code = ("import sys, jaxgrad, jaxgrad.models, jaxgrad.common.flat; "
            "bad = [m for m in ('datasets', 'transformers', 'ml_collections') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"`import jaxgrad` imported heavy modules: {proc.stdout} {proc.stderr[-500:]}"


def test_save_pretrained_roundtrip(tmp_path):
    from jaxgrad.models import save_pretrained

    model, _ = load_pretrained(fixture("tiny-qwen2"), lora=LoraConfig(rank=2))
    hf = json.loads(open(os.path.join(fixture("tiny-qwen2"), "config.json")).read())
    save_pretrained(model, tmp_path / "out", hf)
    again, _ = load_pretrained(str(tmp_path / "out"))
    ref = reference("tiny-qwen2")
    a, mask = run(again, ref)
    assert max_err(a, ref["logits"], mask) < ATOL


@pytest.mark.parametrize("model_type,doc", [("llama", "docs/config_fields.md"),
                                            ("gpt2", "docs/models/gpt2.md"),
                                            ("gpt_neox", "docs/models/gpt_neox.md"),
                                            ("gemma3_text", "docs/models/gemma3.md")])
def test_refusals_point_to_the_familys_table_of_keys(model_type, doc):
    """A refused config.json key names the file where the family's keys are listed."""
    from jaxgrad.models import config_from_hf

    with pytest.raises(ValueError, match=rf"x/config\.json: is_causal=False .*\(see {doc}\)"):
        config_from_hf({"model_type": model_type, "is_causal": False}, source="x/config.json")
    assert os.path.isfile(os.path.join(os.path.dirname(FIXTURES), "..", doc))
