"""Gemma 3 text (jaxgrad.models.gemma3) against transformers' Gemma3ForCausalLM, its GGUF reader and
peft, on tiny random models.

Every checkpoint is a transformers model (vocab 64, hidden 32, 4 layers, 4 heads, 2 kv heads,
head_dim 8, sliding window 3 on 12-token rows so that windows matter; norms drawn away from 0)
saved with ``save_pretrained`` into tmp_path; the torch reference is always ``from_pretrained`` of
the very directory jaxgrad loads. Batches are right-padded; padding positions are not compared.
"""

from __future__ import annotations

import dataclasses
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

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
from jaxgrad.models import gemma3 as g3
from jaxgrad.models import hf_config
from jaxgrad.models.lora import linear_modules
from jaxgrad.gradients.outputs import get_output_fn
from jaxgrad.gradients.per_sample import num_trainable, per_sample_projected_grads
from jaxgrad.gradients.projection import Projector

ATOL = 1e-4  # float32, relative to the logit scale when that exceeds 1 (mc.tol)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=3,
            max_position_embeddings=128)
S, F = g3.SLIDING, g3.FULL
ERRORS: dict[str, float] = {}  # max |jaxgrad - torch| per check (printed with -s)


# ---- helpers ---------------------------------------------------------------------------------------

def _torch_model(config: transformers.Gemma3TextConfig, seed=0) -> torch.nn.Module:
    """A random torch Gemma 3 of logit scale ~5, norms away from transformers' zero init."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _save(path, seed=0, **kw) -> str:
    _torch_model(transformers.Gemma3TextConfig(**{**TINY, **kw}), seed).save_pretrained(path)
    return str(path)


def _load_torch(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _err(ours, ref, mask):
    return float(np.abs(np.asarray(ours) - ref)[mask > 0].max())


def _compare(path, label, width=12, **load_kw):
    """Load ``path`` with jaxgrad and transformers; assert and record max |Δlogit| < ATOL."""
    ids, mask = mc.batch(width)
    ref = mc.torch_causal_logits(_load_torch(path), ids, mask)
    model, _ = load_pretrained(path, with_tokenizer=False, **load_kw)
    ours = np.asarray(model(ids, mask))
    err = _err(ours, ref, mask)
    ERRORS[label] = err
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    assert np.abs(ref).max() > 1.0, "reference logits too small to test anything"
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
    """Sliding and full layers interleaved (legacy sliding_window_pattern 2: S F S F)."""
    return _save(tmp_path_factory.mktemp("gemma3") / "base", sliding_window_pattern=2)


# ---- logits against transformers -------------------------------------------------------------------

def test_default_layer_pattern_and_inert_keys(tmp_path):
    """Default pattern 6 (4 layers: all sliding); keys transformers stores but never applies."""
    d = _save(tmp_path / "m")
    mc.edit_config(d, _sliding_window_pattern=2, attention_dropout=0.3, initializer_range=0.5,
             partial_rotary_factor=0.5,  # the default rope ignores it
             pad_token_id=5, bos_token_id=6, eos_token_id=7, use_cache=False,
             some_future_key={"a": 1}, layer_types=None)  # None: key deleted
    model, ours, _ = _compare(d, "default pattern + inert keys")
    assert model.config.layer_types == (S,) * 4 and model.config.sliding_window == 3
    assert model.lm_head is None  # tied by default
    # the window matters: the same weights with a window wider than the rows differ
    wide = nnx.eval_shape(lambda: build_model(dataclasses.replace(model.config, sliding_window=100)))
    nnx.update(wide, nnx.state(model))
    ids, mask = mc.batch()
    assert _err(wide(ids, mask), ours, mask) > 1e-2


def test_final_logit_softcapping(tmp_path):
    d = _save(tmp_path / "m", sliding_window_pattern=2, final_logit_softcapping=1.5)
    model, ours, ref = _compare(d, "final_logit_softcapping 1.5")
    assert model.config.layer_types == (S, F, S, F)
    assert np.abs(ours).max() <= 1.5 and np.abs(ref).max() > 1.2  # the cap is reached


def test_query_pre_attn_scalar_bias_activation_untied_and_layer_types(tmp_path):
    d = _save(tmp_path / "m", query_pre_attn_scalar=2, attention_bias=True, hidden_activation="gelu",
              tie_word_embeddings=False, rms_norm_eps=0.1,
              layer_types=[F, S, S, F])
    mc.edit_config(d, layer_types=["attention", S, S, F])  # legacy name of full_attention
    model, _, _ = _compare(d, "query_pre_attn_scalar 2, biases, gelu, untied")
    assert model.config.query_pre_attn_scalar == 2 and model.config.layer_types == (F, S, S, F)
    assert model.lm_head is not None and model.model.layers[0].self_attn.o_proj.bias is not None


def test_rope_scaling_on_global_layers(tmp_path):
    d = _save(tmp_path / "m", sliding_window_pattern=2, rope_parameters={
        F: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
        S: {"rope_type": "default", "rope_theta": 100.0}})
    model, _, _ = _compare(d, "rope linear on full layers")
    cfg = model.config
    assert (cfg.full_rope.rope_type, cfg.full_rope.rope_factor, cfg.sliding_rope.rope_theta) == \
        ("linear", 4.0, 100.0)


def test_yarn_global_llama3_local(tmp_path):
    """yarn on full layers (its original_max_position_embeddings defaults to
    max_position_embeddings: a top-level one is never read), llama3 on sliding ones."""
    d = _save(tmp_path / "m", sliding_window_pattern=2, max_position_embeddings=32, rope_parameters={
        F: {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "rope_theta": 100.0},
        S: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8, "rope_theta": 500.0}})
    mc.edit_config(d, original_max_position_embeddings=4)
    model, _, _ = _compare(d, "yarn full, llama3 sliding")
    assert model.config.full_rope.rope_original_max_position == 32
    for lt in (F, S):
        inv, _ = g3.rope_frequencies(model.config, lt, 12)
        plain = dataclasses.replace(model.config.rope(lt), rope_type="default")
        cfg = dataclasses.replace(model.config, full_rope=plain, sliding_rope=plain)
        assert np.abs(np.asarray(inv) - np.asarray(g3.rope_frequencies(cfg, lt, 12)[0])).max() > 1e-4


def test_transformers4_rope_keys(tmp_path):
    """rope_theta (full), rope_local_base_freq (sliding), rope_scaling merged into full layers'."""
    d = _save(tmp_path / "m", sliding_window_pattern=2, rope_parameters={
        F: {"rope_type": "linear", "factor": 2.0, "rope_theta": 50.0},
        S: {"rope_type": "default", "rope_theta": 500.0}})
    mc.edit_config(d, rope_parameters=None, layer_types=None, rope_theta=50.0,
                   rope_local_base_freq=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model, _, _ = _compare(d, "transformers-4 rope keys")
    cfg = model.config
    assert cfg.layer_types == (S, F, S, F)  # from sliding_window_pattern
    assert cfg.full_rope == g3.RopeSpec("linear", 50.0, 2.0)
    assert cfg.sliding_rope == g3.RopeSpec("default", 500.0)


def test_attn_logit_softcapping_is_not_applied_by_transformers():
    """Why jaxgrad refuses the key: transformers 5's Gemma3Attention never applies it."""
    kw = {**TINY, "sliding_window_pattern": 2}
    ids, mask = mc.batch()
    plain = mc.torch_causal_logits(_torch_model(transformers.Gemma3TextConfig(**kw)), ids, mask)
    capped = mc.torch_causal_logits(_torch_model(transformers.Gemma3TextConfig(
        **kw, attn_logit_softcapping=0.01)), ids, mask)
    assert np.array_equal(plain, capped)


@pytest.mark.parametrize("changes, names", [
    (dict(use_bidirectional_attention=True), ["use_bidirectional_attention", "True"]),
    (dict(attn_logit_softcapping=50.0), ["attn_logit_softcapping", "50.0"]),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), ["rope_parameters", "rope_type"]),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), ["rope_scaling.type", "'linear'"]),
    (dict(rope_parameters={F: {"rope_type": "dynamic", "factor": 2.0}}),
     ["rope_parameters.full_attention.rope_type", "'dynamic'"]),
    (dict(rope_parameters={S: {"rope_type": "linear"}}), ["rope_parameters.sliding_attention"]),
    (dict(partial_rotary_factor=0.5, rope_parameters={F: {"rope_type": "linear", "factor": 2.0}}),
     ["partial_rotary_factor", "0.5"]),
    (dict(layer_types=[S, "chunked_attention", S, F]), ["layer_types", "chunked_attention"]),
    (dict(layer_types=[S, F]), ["layer_types"]),
    (dict(sliding_window_pattern=0, layer_types=None), ["sliding_window_pattern", "0"]),
    (dict(sliding_window=None, layer_types=[S, F, S, F]), ["sliding_window", "None"]),
    (dict(hidden_activation="quick_gelu"), ["hidden_activation", "quick_gelu"]),
    (dict(is_causal=False), ["is_causal", "False"]),
    (dict(quantization_config={"quant_method": "gptq"}), ["quantization_config"]),
], ids=["bidirectional", "attn_softcap", "flat_rope", "legacy_type", "dynamic", "linear_no_factor",
        "partial_linear", "unknown_layer_type", "layer_count", "pattern_0", "no_window", "activation",
        "is_causal",
        "quantized"])
def test_refusals_name_config_json_and_key(tmp_path, changes, names):
    cfg = g3.to_hf_config(g3.Gemma3TextConfig(**TINY))
    for k, v in changes.items():
        if v is None and k != "sliding_window":
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mc.refused(str(tmp_path), *names)


def test_null_bidirectional_flag_is_causal():
    cfg = g3.to_hf_config(g3.Gemma3TextConfig(**TINY))
    assert config_from_hf({**cfg, "use_bidirectional_attention": None}) == config_from_hf(cfg)


def test_bfloat16_compute_close_to_float32(base_dir):
    ids, mask = mc.batch()
    ref = mc.torch_causal_logits(_load_torch(base_dir), ids, mask)
    model, _ = load_pretrained(base_dir, dtype="bfloat16", with_tokenizer=False)
    assert model.model.layers[0].self_attn.q_proj.dtype is jnp.bfloat16
    ours = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask))  # one compile
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    err, scale = _err(ours, ref, mask), float(np.abs(ref).max())
    ERRORS["bfloat16 vs torch float32"] = err
    assert 0 < err < 0.05 * scale, f"bfloat16 logits off by {err:.3f} (logit scale {scale:.2f})"


# ---- GGUF -------------------------------------------------------------------------------------------

GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gemma3_gguf(path, model) -> None:
    """``model`` as llama.cpp's convert_hf_to_gguf writes a Gemma 3: llama.cpp tensor names, no
    q/k permutation, every ``*norm.weight`` stored as 1 + w, no ``output`` tensor (tied), F32."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch="gemma3")
    w.add_name("tiny-gemma3")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(float(c.rope_parameters[F]["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(c.vocab_size)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            _, _, i, rest = key.split(".", 3)
            name = f"blk.{i}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
        arr = value.numpy().astype(np.float32)
        w.add_tensor(name, arr + 1 if name.endswith("norm.weight") else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_gemma3_matches_transformers_and_the_original(tmp_path):
    """6 layers (pattern 6: one full layer), global rope base 100 from rope.freq_base."""
    config = transformers.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 6, "rms_norm_eps": 1e-5,
                                              "rope_parameters": {F: {"rope_type": "default",
                                                                      "rope_theta": 100.0},
                                                                  S: {"rope_type": "default",
                                                                      "rope_theta": 10000.0}}})
    original = _torch_model(config, seed=3)
    path = tmp_path / "tiny-gemma3.gguf"
    _write_gemma3_gguf(path, original)
    ids, mask = mc.batch()
    ref = mc.torch_causal_logits(original, ids, mask)
    theirs = mc.torch_causal_logits(transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval(), ids, mask)
    model, tok = load_pretrained(str(path))
    ours = np.asarray(model(ids, mask))
    ERRORS["GGUF: jaxgrad vs transformers' GGUF reading"] = err = _err(ours, theirs, mask)
    assert err < mc.tol(theirs, ATOL)
    ERRORS["GGUF: jaxgrad vs original torch model"] = err = _err(ours, ref, mask)
    assert err < mc.tol(ref, ATOL), "norms must come back as w (llama.cpp stores 1 + w)"
    cfg = model.config
    assert cfg.layer_types == (S,) * 5 + (F,) and cfg.full_rope.rope_theta == 100.0
    assert cfg.sliding_rope.rope_theta == 10000.0 and model.lm_head is None and tok is None
    hf = json.loads((tmp_path / "tiny-gemma3.hf" / "config.json").read_text())
    assert hf["model_type"] == "gemma3_text" and hf["gguf_source"]["architecture"] == "gemma3"
    assert (hf["rope_theta"], hf["rope_local_base_freq"]) == (100.0, 10000.0)


# ---- LoRA and peft ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_dir(base_dir, tmp_path_factory):
    """A nonzero q/k/v adapter made and saved by peft; its torch logits."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                          lora_dropout=0.0)
    model = peft.get_peft_model(_load_torch(base_dir), cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    d = str(tmp_path_factory.mktemp("adapter") / "peft")
    model.save_pretrained(d)
    ids, mask = mc.batch()
    return d, mc.torch_causal_logits(model, ids, mask)


@pytest.fixture(scope="module")
def adapted(base_dir, peft_dir):
    model, _ = load_pretrained(base_dir, with_tokenizer=False)
    load_peft_adapter(model, peft_dir[0])
    return model


QKV = {f"model.layers.{i}.self_attn.{n}" for i in range(4) for n in ("q_proj", "k_proj", "v_proj")}


def test_peft_adapter_matches_torch_peft_both_ways(base_dir, peft_dir, adapted, tmp_path):
    adapter, ref = peft_dir
    ids, mask = mc.batch()
    assert _err(ref, mc.torch_causal_logits(_load_torch(base_dir), ids, mask), mask) > 1e-2, \
        "the adapter should matter"
    assert {p for p, lin in linear_modules(adapted).items() if lin.lora_A is not None} == QKV
    ours = np.asarray(adapted(ids, mask))
    ERRORS["peft adapter: jaxgrad vs torch+peft"] = err = _err(ours, ref, mask)
    assert err < mc.tol(ref, ATOL), f"max |jaxgrad - torch+peft| = {err:.2e}"

    out = tmp_path / "ours"  # export: peft rebuilds the same model from our files
    save_peft_adapter(adapted, out, base_model_name_or_path=base_dir)
    assert set(load_file(out / "adapter_model.safetensors")) == \
        set(load_file(os.path.join(adapter, "adapter_model.safetensors")))
    back = mc.torch_causal_logits(peft.PeftModel.from_pretrained(_load_torch(base_dir), str(out)).eval(),
                         ids, mask)
    ERRORS["our export: torch+peft vs jaxgrad"] = err = _err(ours, back, mask)
    assert err < mc.tol(back, ATOL), f"max |torch+peft(our export) - jaxgrad| = {err:.2e}"


def test_lora_defaults():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M,
    )

    assert tuple(M["gemma3_text"]) == g3.Gemma3ForCausalLM.PEFT_TARGETS
    cfg = g3.Gemma3TextConfig(**TINY)
    model = nnx.eval_shape(lambda: apply_lora(build_model(cfg), LoraConfig(rank=4)))
    assert {p for p, lin in linear_modules(model).items() if lin.lora_A is not None} == QKV


def test_per_sample_projected_grads_equal_one_at_a_time(adapted):
    ids, mask = mc.batch()
    ids = np.concatenate([ids, ids[:1, ::-1]]).astype(np.int32)
    mask = np.concatenate([mask, mask[:1]]).astype(np.int32)
    b = ids.shape[0]
    tmask = np.concatenate([mask[:, 1:], np.zeros((b, 1), np.int32)], axis=1).astype(np.float32)
    tmask[:, :2] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "valid": np.ones((b,), np.float32),
             "example_index": np.arange(b, dtype=np.int32), "source_index": np.zeros((b,), np.int32),
             "targets": np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1),
             "target_mask": tmask}
    proj = Projector(seed=7, dim=num_trainable(adapted), k=8)
    assert proj.dim == 4 * (3 * 4 * 32 + 4 * (32 + 16 + 16))
    res = per_sample_projected_grads(adapted, batch, proj, "token_ce", chunk_size=3)

    graphdef, params, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    fn = get_output_fn("token_ce")

    def f(p, ex):
        logits = model_logits(nnx.merge(graphdef, p, rest), ex)
        return fn(logits, ex["targets"], ex["target_mask"])[0]

    value_and_grad = jax.jit(jax.value_and_grad(f))
    grads, vals = [], []
    for i in range(b):  # one example at a time: no vmap
        v, g = value_and_grad(params, {k: jnp.asarray(x[i:i + 1]) for k, x in batch.items()})
        grads.append(np.asarray(flatten(g)))
        vals.append(float(v))
    expected = np.stack(grads) @ np.asarray(proj.dense())
    assert res.feats.shape == (3, 8) and np.abs(expected).max() > 0
    np.testing.assert_allclose(np.asarray(res.f), vals, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.feats), expected, atol=1e-4 * np.abs(expected).max())


# ---- the table, the doc and transformers agree -----------------------------------------------------

def test_table_covers_every_config_field_with_its_default():
    table = g3.HF_FIELDS["gemma3_text"]
    for f in dataclasses.fields(transformers.Gemma3TextConfig):
        assert f.name in table, f"transformers field {f.name!r} missing from gemma3.HF_FIELDS"
        default = f.default if f.default is not dataclasses.MISSING else None
        assert table[f.name][0] == default, \
            f"{f.name}: table default {table[f.name][0]!r} vs transformers {default!r}"
    assert all(rule in hf_config.RULES for _, rule in table.values())
    assert transformers.Gemma3TextConfig.default_theta == {"global": g3.DEFAULT_THETA[F],
                                                            "local": g3.DEFAULT_THETA[S]}


def test_every_key_transformers_reads_is_in_the_table():
    root = os.path.dirname(transformers.__file__)
    read = set()
    for f in ("models/gemma3/modeling_gemma3.py", "masking_utils.py", "modeling_rope_utils.py"):
        with open(os.path.join(root, f)) as fh:
            for m in mc.READ.finditer(fh.read()):
                read.add(next(g for g in m.groups() if g))
    # read by Gemma3Model / Gemma3ForConditionalGeneration (the multimodal model, model_type
    # gemma3) on its own config, never on a Gemma3TextConfig
    multimodal = {"text_config", "vision_config", "image_token_id", "mm_tokens_per_image"}
    unknown = sorted(read - set(g3.HF_FIELDS["gemma3_text"]) - mc.NOT_KEYS - multimodal)
    assert not unknown, f"transformers reads {unknown}; add them to gemma3.HF_FIELDS and the doc"


def test_doc_table_equals_code_table():
    doc = mc.doc_key_table("gemma3")
    code = {k: rule for k, (_, rule) in g3.HF_FIELDS["gemma3_text"].items()}
    assert doc == code, (f"doc-only {sorted(set(doc) - set(code))}, code-only "
                         f"{sorted(set(code) - set(doc))}, differing "
                         f"{sorted(k for k in set(doc) & set(code) if doc[k] != code[k])}")


def test_to_hf_config_roundtrip():
    cfg = g3.Gemma3TextConfig(
        **{**TINY, "sliding_window": 5}, layer_types=(F, S, S, F), query_pre_attn_scalar=12,
        attention_bias=True, final_logit_softcapping=30.0, tie_word_embeddings=False,
        hidden_activation="gelu", rms_norm_eps=1e-5,
        full_rope=g3.RopeSpec("yarn", 1e6, 8.0, rope_original_max_position=16, rope_beta_fast=8.0),
        sliding_rope=g3.RopeSpec("linear", 1e4, 2.0))
    hf = g3.to_hf_config(cfg)
    assert config_from_hf(hf) == cfg
    theirs = transformers.Gemma3TextConfig.from_dict(hf)
    assert tuple(theirs.layer_types) == cfg.layer_types
    assert theirs.rope_parameters[F]["rope_type"] == "yarn"
    assert theirs.rope_parameters[S] == {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
