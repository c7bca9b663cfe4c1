"""GPT-2 (jaxgrad.models.gpt2) against transformers' GPT2LMHeadModel and peft, on tiny random models.

Every checkpoint is a transformers model (vocab 64, n_embd 32, 2 layers, 4 heads, random weights
of logit scale ~10) saved with ``save_pretrained`` into tmp_path; the torch reference is always
``from_pretrained`` of the very directory jaxgrad loads. Padding positions are not compared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

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
from jaxgrad.common.flat import flatten
from jaxgrad.models.forward import model_logits
from jaxgrad.models import (
    LoraConfig,
    apply_lora,
    build_model,
    config_from_hf,
    load_peft_adapter,
    load_pretrained,
    save_peft_adapter,
)
from jaxgrad.models import gpt2 as gpt2_lib
from jaxgrad.models import hf_config
from jaxgrad.models.lora import linear_modules
from jaxgrad.gradients.outputs import get_output_fn
from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
from jaxgrad.gradients.projection import Projector

ATOL = 1e-4  # float32, relative to the logit scale when that exceeds 1 (mc.tol)
TINY = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=1,
            eos_token_id=1)
WIDTH = 12
ERRORS: dict[str, float] = {}  # max |jaxgrad - torch| per check (printed with -s)


# ---- helpers ---------------------------------------------------------------------------------------

def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from transformers' init (tiny std, unit norms, zero biases) so every term counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"ln_\w+\.weight$", name):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "wte" in name or "wpe" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))


def _save(path, seed=0, **kw) -> str:
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **kw})).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    return str(path)


def _inputs(width=WIDTH):
    ids, mask = mc.batch(width)
    return ids, mask


def _torch_model(path, **kw):
    return transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _err(ours, ref, mask):
    return float(np.abs(np.asarray(ours) - ref)[mask > 0].max())


def _compare(path, label, *, torch_kw=None, **load_kw):
    """Load ``path`` with jaxgrad and transformers; assert and record max |Δlogit| < ATOL."""
    ids, mask = _inputs()
    ref = mc.torch_causal_logits(_torch_model(path, **(torch_kw or {})), ids, mask)
    model, _ = load_pretrained(path, with_tokenizer=False, **load_kw)
    ours = np.asarray(model(ids, mask))
    err = _err(ours, ref, mask)
    ERRORS[label] = err
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    assert err < mc.tol(ref, ATOL), f"{label}: max |jaxgrad - torch| = {err:.2e}"
    return model, ours, ref


@pytest.fixture(scope="module", autouse=True)
def _print_errors():
    """Prints the max |Δlogit| figures the tests gathered (pytest -s)."""
    yield
    for label, err in sorted(ERRORS.items()):
        print(f"  max |dlogit| {label}: {err:.2e}")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("gpt2") / "base")


# ---- logits against transformers -------------------------------------------------------------------

VARIANTS = {
    "default": {},
    "scale_attn_by_inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "scale_attn_weights_false": dict(scale_attn_weights=False),
    "activation_quick_gelu": dict(activation_function="quick_gelu"),
    "n_inner": dict(n_inner=48, layer_norm_epsilon=0.3),
    "untied": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_match_torch(tmp_path, name):
    kw = VARIANTS[name]
    d = _save(tmp_path / "m", **kw)
    model, ours, _ = _compare(d, name)
    cfg = model.config
    for key, value in kw.items():
        assert getattr(cfg, key) == value, f"{key} not read: {getattr(cfg, key)!r}"
    if name == "n_inner":
        assert model.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)
    if name == "untied":
        assert model.lm_head is not None and model.lm_head.weight.shape == (64, 32)
    elif kw and name != "n_inner":
        # the key matters: torch with it reset to the default computes something else
        with open(os.path.join(d, "config.json")) as f:
            hf = json.load(f)
        for key in kw:
            hf[key] = gpt2_lib.HF_FIELDS[key][0]
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hf, f)
        ids, mask = _inputs()
        assert _err(ours, mc.torch_causal_logits(_torch_model(d), ids, mask), mask) > 1e-3, \
            f"{name}: the setting should change the logits"
    if name == "default":
        assert model.lm_head is None and cfg.inner_dim == 128
        assert model.transformer.h[0].attn.c_attn.transposed


def test_reorder_and_upcast_attn_matches_eager_torch(tmp_path):
    """transformers runs _upcast_and_reordered_attn only in eager mode; in float32 it computes
    what the default path computes, and so does jaxgrad."""
    d = _save(tmp_path / "m", reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    model, _, _ = _compare(d, "reorder_and_upcast_attn(eager)",
                           torch_kw=dict(attn_implementation="eager"))
    assert model.config.reorder_and_upcast_attn


def test_bare_gpt2model_checkpoint_with_attention_buffers(tmp_path, base_dir):
    """Keys without the ``transformer.`` prefix (as the Hub's gpt2) plus the causal-mask buffers
    ``attn.bias`` / ``attn.masked_bias`` of older checkpoints, which transformers ignores."""
    d = tmp_path / "bare"
    d.mkdir()
    tensors = load_file(os.path.join(base_dir, "model.safetensors"))
    bare = {k[len("transformer."):]: v for k, v in tensors.items() if k.startswith("transformer.")}
    assert len(bare) == len(tensors) and "wte.weight" in bare  # the tied head is not saved
    for i in range(TINY["n_layer"]):
        bare[f"h.{i}.attn.bias"] = np.tril(np.ones((16, 16), np.float32))[None, None]
        bare[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    save_file(bare, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(base_dir, "config.json")) as f:
        hf = json.load(f)
    hf["architectures"] = ["GPT2Model"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf, f)
    model, ours, _ = _compare(str(d), "bare GPT2Model + attn.bias buffers")
    assert model.lm_head is None
    base, _ = load_pretrained(base_dir, with_tokenizer=False)
    np.testing.assert_array_equal(ours, np.asarray(base(*_inputs())))
    # any other stray tensor is still an error
    bare["h.0.attn.extra"] = np.zeros((2,), np.float32)
    save_file(bare, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors: \['h\.0\.attn\.extra'\]"):
        load_pretrained(str(d), with_tokenizer=False)


def test_activations_equal_transformers_act2fn():
    from transformers.activations import ACT2FN

    x = np.linspace(-12, 12, 1001, dtype=np.float32)
    for name, fn in gpt2_lib.ACTIVATIONS.items():
        ref = ACT2FN[name](torch.tensor(x)).numpy()
        err = np.abs(np.asarray(fn(jnp.asarray(x))) - ref).max()
        assert err < 1e-5 * max(1.0, np.abs(ref).max()), f"{name}: {err:.2e}"
    refused = set(ACT2FN) - set(gpt2_lib.ACTIVATIONS)
    assert {"prelu", "xielu", "laplace"} <= refused


# ---- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, names", [
    (dict(add_cross_attention=True), ["add_cross_attention", "True", "cross-attention"]),
    (dict(activation_function="laplace"), ["activation_function", "'laplace'"]),
    (dict(n_head=5), ["n_head=5", "n_embd=32"]),
    (dict(num_attention_heads=3), ["num_attention_heads=3"]),
    (dict(n_inner=0), ["n_inner=0"]),
    (dict(is_causal=False), ["is_causal"]),
    (dict(quantization_config={"quant_method": "gptq"}), ["quantization_config"]),
], ids=["add_cross_attention", "activation", "n_head", "alias", "n_inner", "is_causal", "quant"])
def test_refused_config_values_name_file_and_key(tmp_path, base_dir, changes, names):
    d = tmp_path / "m"
    d.mkdir()
    with open(os.path.join(base_dir, "config.json")) as f:
        hf = json.load(f)
    hf.update(changes)
    with open(d / "config.json", "w") as f:
        json.dump(hf, f)
    os.link(os.path.join(base_dir, "model.safetensors"), d / "model.safetensors")
    mc.refused(str(d), *names)


def test_sequence_longer_than_n_positions_refused(base_dir):
    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    ok = jnp.ones((1, 16), jnp.int32)  # exactly n_positions is fine (traced only: no compile)
    assert nnx.eval_shape(lambda m: m(ok, ok), model).shape == (1, 16, 64)
    long = jnp.ones((1, 17), jnp.int32)
    for call in (lambda: model(long, long), lambda: model.hidden_states(long, long),
                 lambda: nnx.jit(lambda m, x: m(x, x))(model, long)):
        with pytest.raises(ValueError, match=r"17 tokens is longer than n_positions=16"):
            call()


# ---- dtypes -----------------------------------------------------------------------------------------

def test_bfloat16_compute_close_to_float32(base_dir):
    ids, mask = _inputs()
    ref = mc.torch_causal_logits(_torch_model(base_dir), ids, mask)
    model, _ = load_pretrained(base_dir, dtype="bfloat16", with_tokenizer=False)
    assert model.transformer.h[0].attn.c_attn.dtype is jnp.bfloat16
    ours = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask))  # one compile
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    err = _err(ours, ref, mask)
    scale = float(np.abs(ref).max())
    ERRORS["bfloat16 vs torch float32"] = err
    assert 0 < err < 0.05 * scale, f"bfloat16 logits off by {err:.3f} (logit scale {scale:.2f})"


# ---- LoRA and peft ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_dir(base_dir, tmp_path_factory):
    """A nonzero c_attn adapter made and saved by peft; its torch logits."""
    base = _torch_model(base_dir)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    d = str(tmp_path_factory.mktemp("adapter") / "peft")
    model.save_pretrained(d)
    ids, mask = _inputs()
    return d, mc.torch_causal_logits(model, ids, mask)


def _adapted(base_dir, adapter):
    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    load_peft_adapter(model, adapter)
    return model


C_ATTN = {f"transformer.h.{i}.attn.c_attn" for i in range(TINY["n_layer"])}


def test_peft_adapter_matches_torch_peft_both_ways(base_dir, peft_dir, tmp_path):
    adapter, ref = peft_dir
    ids, mask = _inputs()
    base_ref = mc.torch_causal_logits(_torch_model(base_dir), ids, mask)
    assert _err(ref, base_ref, mask) > 1e-2, "the adapter should matter"
    model = _adapted(base_dir, adapter)
    assert {p for p, l in linear_modules(model).items() if l.lora_A is not None} == C_ATTN
    ours = np.asarray(model(ids, mask))
    ERRORS["peft adapter: jaxgrad vs torch+peft"] = err = _err(ours, ref, mask)
    assert err < mc.tol(ref, ATOL), f"max |jaxgrad - torch+peft| = {err:.2e}"

    # export: peft rebuilds the same model from our files
    out = tmp_path / "ours"
    save_peft_adapter(model, out, base_model_name_or_path=base_dir)
    with open(out / "adapter_config.json") as f:
        exported = json.load(f)
    assert exported["fan_in_fan_out"] is True and exported["target_modules"] == ["c_attn"]
    assert set(load_file(out / "adapter_model.safetensors")) == \
        set(load_file(os.path.join(adapter, "adapter_model.safetensors")))
    torch_model = peft.PeftModel.from_pretrained(_torch_model(base_dir), str(out)).eval()
    back = mc.torch_causal_logits(torch_model, ids, mask)
    ERRORS["our export: torch+peft vs jaxgrad"] = err = _err(ours, back, mask)
    assert err < mc.tol(back, ATOL), f"max |torch+peft(our export) - jaxgrad| = {err:.2e}"


def test_adapter_config_without_target_modules_adapts_peft_default(base_dir, peft_dir, tmp_path):
    adapter, ref = peft_dir
    d = tmp_path / "no_targets"
    d.mkdir()
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        raw = json.load(f)
    raw.pop("target_modules")
    with open(d / "adapter_config.json", "w") as f:
        json.dump(raw, f)
    os.link(os.path.join(adapter, "adapter_model.safetensors"), d / "adapter_model.safetensors")
    model = _adapted(base_dir, d)
    assert {p for p, l in linear_modules(model).items() if l.lora_A is not None} == C_ATTN
    ids, mask = _inputs()
    assert _err(model(ids, mask), ref, mask) < mc.tol(ref, ATOL)


def test_lora_defaults():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M,
    )

    assert tuple(M["gpt2"]) == gpt2_lib.GPT2LMHeadModel.PEFT_TARGETS
    cfg = gpt2_lib.GPT2Config(**{k: TINY[k] for k in ("vocab_size", "n_embd", "n_layer", "n_head",
                                                      "n_positions")})
    # shapes only (nnx.eval_shape): no random initialisation to compile
    model = nnx.eval_shape(lambda: apply_lora(build_model(cfg), LoraConfig(rank=4)))
    adapted = {p: l for p, l in linear_modules(model).items() if l.lora_A is not None}
    assert set(adapted) == C_ATTN
    lin = adapted["transformer.h.0.attn.c_attn"]
    assert lin.lora_A.shape == (4, 32) and lin.lora_B.shape == (96, 4)
    untied = nnx.eval_shape(lambda: apply_lora(
        build_model(dataclasses.replace(cfg, tie_word_embeddings=False)),
        LoraConfig(rank=2, target_modules=("all-linear",))))
    adapted = {p for p, l in linear_modules(untied).items() if l.lora_A is not None}
    assert "lm_head" not in adapted and len(adapted) == 4 * TINY["n_layer"]


# ---- per-sample gradients ---------------------------------------------------------------------------

def _batch_dict():
    ids, mask = _inputs()
    ids = np.concatenate([ids, ids[:1, ::-1]]).astype(np.int32)
    mask = np.concatenate([mask, mask[:1]]).astype(np.int32)
    b = ids.shape[0]
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    tmask = np.concatenate([mask[:, 1:], np.zeros((b, 1), np.int32)], axis=1).astype(np.float32)
    tmask[:, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "valid": np.ones((b,), np.float32),
            "example_index": np.arange(b, dtype=np.int32), "source_index": np.zeros((b,), np.int32),
            "targets": targets, "target_mask": tmask}


def test_per_sample_projected_grads_equal_one_at_a_time(base_dir, peft_dir):
    model = _adapted(base_dir, peft_dir[0])
    batch = _batch_dict()
    proj = Projector(seed=7, dim=num_trainable(model), k=8)
    assert proj.dim == 2 * (4 * 32 + 96 * 4)
    res = per_sample_projected_grads(model, batch, proj, "token_ce", chunk_size=3)

    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    fn = get_output_fn("token_ce")

    def f(p, ex):
        logits = model_logits(nnx.merge(graphdef, p, rest), ex)
        return fn(logits, ex["targets"], ex["target_mask"])[0]

    value_and_grad = jax.jit(jax.value_and_grad(f))
    grads, vals = [], []
    for i in range(batch["input_ids"].shape[0]):  # one example at a time: no vmap
        v, g = value_and_grad(params, {k: jnp.asarray(x[i:i + 1]) for k, x in batch.items()})
        grads.append(np.asarray(flatten(g)))
        vals.append(float(v))
    expected = np.stack(grads) @ np.asarray(proj.dense())
    assert res.feats.shape == (3, 8) and np.abs(expected).max() > 0
    np.testing.assert_allclose(np.asarray(res.f), vals, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.feats), expected, atol=1e-4 * np.abs(expected).max())


# ---- the table, the doc and transformers agree -----------------------------------------------------

def test_table_covers_every_gpt2config_field_with_its_default():
    table = gpt2_lib.HF_FIELDS
    for f in dataclasses.fields(transformers.GPT2Config):
        assert f.name in table, f"transformers field {f.name!r} missing from gpt2.HF_FIELDS"
        default = f.default if f.default is not dataclasses.MISSING else None
        assert table[f.name][0] == default, \
            f"{f.name}: table default {table[f.name][0]!r} vs transformers {default!r}"
    assert all(rule in hf_config.RULES for _, rule in table.values())
    assert set(gpt2_lib.ATTRIBUTE_MAP.items()) == set(transformers.GPT2Config.attribute_map.items())


def test_every_key_transformers_reads_is_in_the_table():
    root = os.path.dirname(transformers.__file__)
    read = set()
    for f in ("models/gpt2/modeling_gpt2.py", "masking_utils.py"):
        with open(os.path.join(root, f)) as fh:
            for m in mc.READ.finditer(fh.read()):
                read.add(next(g for g in m.groups() if g))
    not_keys = mc.NOT_KEYS | {"num_labels",  # classification heads, set from id2label
                               "crossattention", "q_attn"}  # hasattr(self, ...) on modules
    unknown = sorted(read - set(gpt2_lib.HF_FIELDS) - not_keys)
    assert not unknown, f"transformers reads {unknown}; add them to gpt2.HF_FIELDS and the doc"


def test_doc_table_equals_code_table():
    doc = mc.doc_key_table("gpt2")
    code = {k: rule for k, (_, rule) in gpt2_lib.HF_FIELDS.items()}
    assert doc == code, (f"doc-only {sorted(set(doc) - set(code))}, code-only "
                         f"{sorted(set(code) - set(doc))}, differing "
                         f"{sorted(k for k in set(doc) & set(code) if doc[k] != code[k])}")


def test_to_hf_config_roundtrip_and_aliases():
    cfg = gpt2_lib.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                              n_inner=48, activation_function="relu", layer_norm_epsilon=0.25,
                              scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
                              reorder_and_upcast_attn=True, tie_word_embeddings=False)
    hf = gpt2_lib.to_hf_config(cfg)
    assert config_from_hf(hf) == cfg
    assert transformers.GPT2Config.from_dict(hf).n_inner == 48
    # GPT2Config.attribute_map: the alias wins, as in transformers
    raw = {"model_type": "gpt2", **TINY, "hidden_size": 48, "num_attention_heads": 8}
    ours, theirs = config_from_hf(raw), transformers.GPT2Config.from_dict(raw)
    assert (ours.n_embd, ours.n_head) == (theirs.n_embd, theirs.n_head) == (48, 8)
