"""GPT-NeoX / Pythia against transformers' GPTNeoXForCausalLM and peft (torch, CPU).

Tiny random models built here (vocab 64, hidden 32, 2 layers, 4 heads of 8), saved with
``save_pretrained``; the reference is always ``from_pretrained`` of the directory jaxgrad loads.
Weights are drawn with std 0.2 and random norms / biases so that every config field moves the
logits. Padding positions are not compared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from helpers import models as mc
from jaxgrad.models import (
    LoraConfig,
    apply_lora,
    config_from_hf,
    load_peft_adapter,
    load_pretrained,
    save_peft_adapter,
)
from jaxgrad.models import gpt_neox as neox
from jaxgrad.models.hf_config import RULES
from jaxgrad.models.lora import linear_modules

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, initializer_range=0.2, max_position_embeddings=64)
ATOL = 1e-4
QKV = {f"gpt_neox.layers.{i}.attention.query_key_value" for i in range(2)}


def _save(path, seed=0, base_model=False, **kw):
    """A tiny random transformers GPT-NeoX built from ``TINY | kw``, saved at ``path``."""
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(**{**TINY, **kw})
    model = (transformers.GPTNeoXModel if base_model else transformers.GPTNeoXForCausalLM)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif "layernorm" in name or "layer_norm" in name:
                p.normal_(1, 0.3)
    model.save_pretrained(path)
    return str(path)


def _torch(path):
    return transformers.GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _compare(path, name, **load_kw):
    """max |jaxgrad - torch| over real tokens of a right-padded batch; asserted below ATOL."""
    ids, mask = mc.batch()
    ref = mc.torch_causal_logits(_torch(path), ids, mask)
    model, _ = load_pretrained(path, with_tokenizer=False, **load_kw)
    ours = np.asarray(model(ids, mask))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = float(np.abs(ours - ref)[mask > 0].max())
    print(f"max |jaxgrad - torch| {name}: {err:.2e}")
    assert err < mc.tol(ref, ATOL), f"{name}: max |jaxgrad - torch| = {err:.2e}"
    return model, ours, ref


def _edit(path, **changes):
    mc.edit_config(path, **changes)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The default tiny model (transformers 5 config.json, partial rotary 0.25)."""
    return _save(tmp_path_factory.mktemp("neox") / "base")


@pytest.fixture
def copy(base_dir, tmp_path):
    def make(**changes):
        d = str(tmp_path / f"copy{len(os.listdir(tmp_path))}")
        shutil.copytree(base_dir, d)
        return _edit(d, **changes)
    return make


# ---- logits against transformers -------------------------------------------------------------------

VARIANTS = {
    "parallel_residual": {},
    "sequential_residual": dict(use_parallel_residual=False),
    "full_rotary_theta100_gelu_new": dict(rope_parameters={"rope_type": "default",
                                                          "rope_theta": 100.0,
                                                          "partial_rotary_factor": 1.0},
                                          hidden_act="gelu_new", layer_norm_eps=0.1),
    "tied": dict(tie_word_embeddings=True),
    "no_attention_bias": dict(attention_bias=False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_torch(tmp_path, name):
    model, _, _ = _compare(_save(tmp_path / "m", **VARIANTS[name]), name)
    cfg = model.config
    layer = model.gpt_neox.layers[0]
    assert cfg.use_parallel_residual == VARIANTS[name].get("use_parallel_residual", True)
    assert (model.embed_out is None) == (name == "tied")
    assert (layer.attention.query_key_value.bias is None) == (name == "no_attention_bias")
    assert layer.attention.query_key_value.weight.shape == (96, 32)


@pytest.mark.parametrize("pct", [0.25, 0.5])
def test_transformers4_rotary_pct_and_base(tmp_path, copy, pct):
    """Pythia's config.json: rotary_pct / rotary_emb_base and no rope dictionary. A top-level
    rope_theta / partial_rotary_factor is ignored, as transformers ignores it."""
    d = _save(tmp_path / "m", rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                "partial_rotary_factor": pct})
    _edit(d, rope_parameters=None, rotary_pct=pct, rotary_emb_base=100,
          rope_theta=7.0, partial_rotary_factor=1.0)
    model, ours, _ = _compare(d, f"rotary_pct={pct}")
    assert (model.config.partial_rotary_factor, model.config.rope_theta) == (pct, 100.0)
    assert model.config.rotary_width == int(8 * pct)
    # the rotation matters: the same weights with full rotary give other logits
    _edit(d, rotary_pct=1.0)
    other, _ = load_pretrained(d, with_tokenizer=False)
    ids, mask = mc.batch()
    assert np.abs(np.asarray(other(ids, mask)) - ours)[mask > 0].max() > 1e-3


ROPES = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                    "partial_rotary_factor": 0.5}),
    "dynamic": dict(max_position_embeddings=8,  # the 12-token batch grows past it
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                     "partial_rotary_factor": 0.5}),
    "yarn": dict(max_position_embeddings=32,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 100.0,
                                  "original_max_position_embeddings": 8,
                                  "partial_rotary_factor": 1.0}),
    "longrope": dict(max_position_embeddings=32,
                     rope_parameters={"rope_type": "longrope",
                                      "original_max_position_embeddings": 8,
                                      "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0],
                                      "partial_rotary_factor": 0.5}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "rope_theta": 500.0,
                                    "original_max_position_embeddings": 8,
                                    "partial_rotary_factor": 1.0}),
    "proportional": dict(rope_parameters={"rope_type": "proportional", "factor": 2.0,
                                          "partial_rotary_factor": 0.5}),
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_types_match_torch(tmp_path, name):
    model, _, _ = _compare(_save(tmp_path / "m", **ROPES[name]), f"rope {name}")
    cfg = model.config
    assert cfg.rope_type == name
    inv, att = neox.rope_frequencies(cfg.rope_view(), 12)
    plain, _ = neox.rope_frequencies(dataclasses.replace(cfg.rope_view(), rope_type="default"), 12)
    assert np.abs(np.asarray(inv) - np.asarray(plain)).max() > 1e-4 or att != 1.0


def test_rope_scaling_replaces_rope_parameters_and_takes_legacy_keys(tmp_path):
    d = _save(tmp_path / "m", rope_parameters={"rope_type": "linear", "factor": 3.0,
                                                "rope_theta": 50.0, "partial_rotary_factor": 0.5})
    _edit(d, rope_parameters={"rope_type": "default"}, rope_scaling={"type": "linear", "factor": 3.0},
          rotary_emb_base=50, rotary_pct=0.5)
    model, _, _ = _compare(d, "rope_scaling")
    assert (model.config.rope_type, model.config.rope_factor, model.config.rope_theta,
            model.config.partial_rotary_factor) == ("linear", 3.0, 50.0, 0.5)


def test_head_dim_key_changes_only_the_rope(tmp_path):
    """modeling_rope_utils reads config.json's head_dim; GPTNeoXAttention does not."""
    d = _save(tmp_path / "m", head_dim=16, rope_parameters={"rope_type": "default",
                                                             "partial_rotary_factor": 0.25})
    model, _, _ = _compare(d, "head_dim=16")
    assert model.config.rotary_width == 4 and model.config.head_size == 8


def test_old_pythia_buffers_ignored_other_tensors_refused(tmp_path, copy):
    d = copy()
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    for i in range(2):
        p = f"gpt_neox.layers.{i}.attention."
        tensors[p + "bias"] = np.tril(np.ones((64, 64), bool))[None, None]
        tensors[p + "masked_bias"] = np.array(-1e9, np.float32)
        tensors[p + "rotary_emb.inv_freq"] = np.ones((1,), np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    _compare(d, "old buffers")
    tensors["gpt_neox.layers.0.attention.extra"] = np.ones((2,), np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors: \['gpt_neox.layers.0.attention.extra'\]"):
        load_pretrained(d, with_tokenizer=False)


def test_checkpoint_of_the_bare_base_model(tmp_path):
    """Saved from GPTNeoXModel (no gpt_neox. prefix) with tied embeddings: loads as transformers."""
    d = _save(tmp_path / "m", base_model=True, tie_word_embeddings=True)
    assert "embed_in.weight" in load_file(os.path.join(d, "model.safetensors"))
    model, _, _ = _compare(d, "bare GPTNeoXModel")
    assert model.embed_out is None


def test_bfloat16_close_to_float32(base_dir):
    ids, mask = mc.batch()
    ref = mc.torch_causal_logits(_torch(base_dir), ids, mask)
    model, _ = load_pretrained(base_dir, with_tokenizer=False, dtype="bfloat16")
    assert model.config.dtype is jnp.bfloat16
    ours = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask))  # jit: fewer compiles
    err = float(np.abs(ours - ref)[mask > 0].max())
    scale = float(np.abs(ref).max())
    print(f"max |jaxgrad bfloat16 - torch float32|: {err:.2e} (logit scale {scale:.2f})")
    h = jax.eval_shape(model.hidden_states, ids, mask)
    assert h.shape == (2, 12, 32) and h.dtype == jnp.bfloat16
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    assert 0 < err < 0.05 * scale, f"bfloat16 logits off by {err:.3f} (scale {scale:.2f})"


# ---- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, names", [
    (dict(is_causal=False), ("is_causal",)),
    (dict(quantization_config={"quant_method": "gptq"}), ("quantization_config",)),
    (dict(hidden_act="quick_gelu"), ("hidden_act", "quick_gelu")),
    (dict(num_attention_heads=5), ("num_attention_heads", "5")),
    (dict(rope_parameters={"rope_type": "su", "factor": 2.0}), ("rope_parameters.rope_type", "su")),
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.375}),
     ("rope_parameters.partial_rotary_factor", "0.375", "odd")),
    (dict(rope_parameters=None, rotary_pct=0.375), ("rotary_pct", "0.375")),
    (dict(head_dim=64), ("rope_parameters.partial_rotary_factor", "head size 8")),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), ("partial_rotary_factor",
                                                                    "divides by zero")),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ("rope_scaling",)),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}, head_dim=None), ("head_dim",)),
], ids=["is_causal", "quantization", "hidden_act", "heads", "rope_type", "odd_rotary",
        "odd_rotary_pct", "rotary_wider_than_head", "dynamic_dim2", "llama3_missing", "head_dim_null"])
def test_refusals_name_config_json_and_the_key(copy, changes, names):
    d = copy()
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is None and k != "head_dim"]:
        cfg.pop(k)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    mc.refused(d, *names)


# ---- the table, the doc and transformers agree -------------------------------------------------------

TABLE = neox.HF_FIELDS["gpt_neox"]


def test_table_covers_every_config_field_with_its_default():
    for f in dataclasses.fields(transformers.GPTNeoXConfig):
        assert f.name in TABLE, f"transformers field {f.name!r} missing from HF_FIELDS"
        default = f.default if f.default is not dataclasses.MISSING else None
        assert TABLE[f.name][0] == default, f"{f.name}: {TABLE[f.name][0]!r} vs {default!r}"
    assert all(rule in RULES for _, rule in TABLE.values())


def test_every_key_transformers_reads_is_in_the_table():
    """Config attributes read by the modeling code, the mask and the rope helpers, and the legacy
    keys GPTNeoXConfig.convert_rope_params_to_dict pops from config.json."""
    root = os.path.dirname(transformers.__file__)
    read = set()
    for f in ("models/gpt_neox/modeling_gpt_neox.py", "masking_utils.py", "modeling_rope_utils.py"):
        for m in mc.READ.finditer(open(os.path.join(root, f)).read()):
            read.add(next(g for g in m.groups() if g))
    source = open(os.path.join(root, "models/gpt_neox/configuration_gpt_neox.py")).read()
    popped = set(re.findall(r'kwargs\.pop\("(\w+)"', source))
    assert {"rotary_pct", "rotary_emb_base", "rope_scaling"} <= popped
    ignored = mc.NOT_KEYS | {"num_labels"}  # classification / QA heads only
    unknown = sorted((read | popped) - set(TABLE) - ignored)
    assert not unknown, f"transformers reads {unknown}; add them to HF_FIELDS and the doc"


def test_doc_table_equals_code_table():
    doc = mc.doc_key_table("gpt_neox")
    code = {k: rule for k, (_, rule) in TABLE.items()}
    assert doc == code, (f"doc-only {sorted(set(doc) - set(code))}, code-only "
                         f"{sorted(set(code) - set(doc))}, differing "
                         f"{sorted(k for k in set(doc) & set(code) if doc[k] != code[k])}")


@pytest.mark.parametrize("rope", [{"rope_type": "default", "partial_rotary_factor": 0.5},
                                  ROPES["yarn"]["rope_parameters"],
                                  ROPES["proportional"]["rope_parameters"]],
                         ids=["default", "yarn", "proportional"])
def test_to_hf_config_roundtrip(rope):
    cfg = config_from_hf({"model_type": "gpt_neox", **TINY, "rope_parameters": rope,
                          "use_parallel_residual": False, "attention_bias": False})
    hf = neox.to_hf_config(cfg)
    assert config_from_hf(hf) == cfg
    theirs = transformers.GPTNeoXConfig.from_dict(hf)
    assert theirs.rope_parameters["partial_rotary_factor"] == cfg.partial_rotary_factor
    assert theirs.rope_parameters["rope_type"] == cfg.rope_type
    assert not theirs.use_parallel_residual and not theirs.attention_bias


def test_save_pretrained_loads_in_transformers(base_dir, tmp_path):
    """hub.save_pretrained with to_hf_config: transformers computes the same logits."""
    from jaxgrad.models import save_pretrained

    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    save_pretrained(model, tmp_path / "out", neox.to_hf_config(model.config))
    ids, mask = mc.batch()
    ref = mc.torch_causal_logits(_torch(tmp_path / "out"), ids, mask)
    assert np.abs(np.asarray(model(ids, mask)) - ref)[mask > 0].max() < mc.tol(ref, ATOL)


# ---- LoRA and peft -----------------------------------------------------------------------------------

def _adapted(model):
    return {p for p, lin in linear_modules(model).items() if lin.lora_A is not None}


def test_peft_adapter_both_ways(base_dir, tmp_path):
    """torch peft adapter -> load_peft_adapter: same logits; our save_peft_adapter ->
    peft.PeftModel.from_pretrained: same logits; no target_modules: peft's default."""
    ids, mask = mc.batch()
    torch.manual_seed(1)
    pm = peft.get_peft_model(_torch(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query_key_value"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.eval().save_pretrained(tmp_path / "theirs")
    ref = mc.torch_causal_logits(pm, ids, mask)
    base_ref = mc.torch_causal_logits(_torch(base_dir), ids, mask)
    assert np.abs(ref - base_ref)[mask > 0].max() > 1e-2, "the adapter should matter"

    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    load_peft_adapter(model, tmp_path / "theirs")
    assert _adapted(model) == QKV
    ours = np.asarray(model(ids, mask))
    err = float(np.abs(ours - ref)[mask > 0].max())
    print(f"max |jaxgrad - torch| peft adapter torch -> jaxgrad: {err:.2e}")
    assert err < mc.tol(ref, ATOL), err

    for lin in linear_modules(model).values():  # new values, then export
        if lin.lora_B is not None:
            lin.lora_B[...] = -2.0 * lin.lora_B[...] + 0.1
    ours = np.asarray(model(ids, mask))
    save_peft_adapter(model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_torch(base_dir), tmp_path / "ours").eval()
    ref = mc.torch_causal_logits(back, ids, mask)
    err = float(np.abs(ours - ref)[mask > 0].max())
    print(f"max |jaxgrad - torch| peft adapter jaxgrad -> torch: {err:.2e}")
    assert err < mc.tol(ref, ATOL), err

    f = tmp_path / "theirs" / "adapter_config.json"
    raw = json.load(open(f))
    raw.pop("target_modules")
    json.dump(raw, open(f, "w"))
    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    load_peft_adapter(model, tmp_path / "theirs")
    assert _adapted(model) == QKV
    torch_default = peft.PeftModel.from_pretrained(_torch(base_dir), tmp_path / "theirs").eval()
    ref = mc.torch_causal_logits(torch_default, ids, mask)
    assert np.abs(np.asarray(model(ids, mask)) - ref)[mask > 0].max() < mc.tol(ref, ATOL)


def test_apply_lora_targets(base_dir, tmp_path):
    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    apply_lora(model, LoraConfig(rank=4))
    assert _adapted(model) == QKV
    assert model.gpt_neox.layers[0].attention.query_key_value.lora_B.shape == (96, 4)

    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    apply_lora(model, LoraConfig(rank=4, target_modules=("all-linear",)))
    ours = _adapted(model)
    assert "embed_out" in linear_modules(model) and "embed_out" not in ours
    theirs = peft.get_peft_model(_torch(base_dir), peft.LoraConfig(r=4, target_modules="all-linear"))
    theirs = {n[len("base_model.model."):-len(".lora_A")] for n, _ in theirs.named_modules()
              if n.endswith(".lora_A")}
    assert ours == theirs and len(ours) == 8

    # an adapter on the head trains, but cannot go to peft (its model calls the head lm_head)
    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    apply_lora(model, LoraConfig(rank=4, target_modules=("embed_out",)))
    with pytest.raises(ValueError, match="output head 'embed_out', which peft's model calls 'lm_head'"):
        save_peft_adapter(model, tmp_path / "head")


def test_per_sample_projected_grads_equal_one_at_a_time(tmp_path):
    """vmap(grad) + projection against jax.grad one example at a time, projected densely. One
    layer: the two jit compilations dominate this file's time, and a layer adds nothing here."""
    from helpers.gradients import one_at_a_time

    from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
    from jaxgrad.gradients.projection import Projector

    model, _ = load_pretrained(_save(tmp_path / "m", num_hidden_layers=1), with_tokenizer=False)
    apply_lora(model, LoraConfig(rank=2))
    for lin in linear_modules(model).values():
        if lin.lora_B is not None:  # nonzero B: the A gradients are informative too
            lin.lora_B[...] = 0.1 * jnp.ones_like(lin.lora_B[...])
    ids, mask = mc.batch()
    ids, mask = np.concatenate([ids, ids[:1, ::-1]]), np.concatenate([mask, mask[:1]])
    ids, mask = ids.astype(np.int32), mask.astype(np.int32)
    b = ids.shape[0]
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    tmask = np.concatenate([mask[:, 1:], np.zeros((b, 1), np.int32)], axis=1).astype(np.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets, "target_mask": tmask,
             "valid": np.ones((b,), np.float32), "example_index": np.arange(b, dtype=np.int32),
             "source_index": np.zeros((b,), np.int32)}
    proj = Projector(seed=3, dim=num_trainable(model), k=8)
    res = per_sample_projected_grads(model, batch, proj, "token_ce", chunk_size=2)
    grads, vals = one_at_a_time(model, batch, "token_ce")
    expected = grads @ np.asarray(proj.dense())
    assert res.feats.shape == (3, 8) and np.abs(expected).max() > 0
    np.testing.assert_allclose(np.asarray(res.f), vals, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.feats), expected,
                               atol=1e-4 * np.abs(expected).max())
