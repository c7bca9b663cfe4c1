"""Every config.json key of the supported model types, against transformers (issue 12).

Kind 1: config fields that change the computation are computed exactly (torch parity on tiny
random models built here with transformers: vocab 64, hidden 32, 2 layers) or refused with a
ValueError naming the file, the field and its value; docs/config_fields.md and the code's table
(``jaxgrad.models.llama.HF_FIELDS``, ``jaxgrad.models.t5.HF_FIELDS``) agree with each other and
with the installed transformers' config classes and modeling code.

Kind 3: one dtype rule for every entry point (float32 / bfloat16; float16 and the rest refused by
name). Kind 11: loading emits no deprecation warnings from jaxgrad.

The torch reference is always ``from_pretrained`` of the very directory jaxgrad loads, so it
reads config.json the way a transformers user would. Padding positions are not compared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped
import transformers
from safetensors.numpy import load_file, save_file

from helpers import fixture
from jaxgrad.models import LlamaConfig, LoraConfig, T5Config, config_from_hf, load_pretrained
from jaxgrad.models import hf_config
from jaxgrad.models import llama as llama_lib
from jaxgrad.models import rope as rope_lib
from jaxgrad.models import t5 as t5_lib

ATOL = 1e-5  # float32; relative to the logit scale when that exceeds 1


def _tol(ref, atol):
    return atol * max(1.0, float(np.abs(ref).max()))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}


# ---- helpers ---------------------------------------------------------------------------------------

def _batch(width=12, vocab=64, seed=0):
    """A right-padded batch: a full row and a row with 4 padding positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (2, width)).astype(np.int64)
    mask = np.ones((2, width), np.int64)
    mask[1, width - 4:] = 0
    ids[1, width - 4:] = 0
    return ids, mask


def _save_decoder(path, model_type="llama", nonzero_biases=True, seed=0, **kw):
    """Save a tiny random transformers decoder of ``model_type`` built from ``TINY | kw``."""
    torch.manual_seed(seed)
    cfg = getattr(transformers, CLASSES[model_type])(**{**TINY, **kw})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and nonzero_biases:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


def _edit(path, **changes):
    """Set (or, for ``None``, delete) keys of ``path``/config.json."""
    f = os.path.join(path, "config.json")
    cfg = json.load(open(f))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(f, "w"))


def _torch_logits(path, inputs, seq2seq=False):
    cls = transformers.T5ForConditionalGeneration if seq2seq else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


def _compare_decoder(path, width=12, atol=ATOL):
    """max |jaxgrad - torch| over real tokens; asserts it is below ``atol``."""
    ids, mask = _batch(width)
    ref = _torch_logits(path, dict(input_ids=ids, attention_mask=mask))
    model, _ = load_pretrained(path, with_tokenizer=False)
    ours = np.asarray(model(ids, mask))
    err = float(np.abs(ours - ref)[mask > 0].max())
    assert err < _tol(ref, atol), f"{path}: max |jaxgrad - torch| = {err:.2e}"
    return model, ours, ref


def _refused(path, *names):
    """load_pretrained(path) raises a ValueError naming config.json and each of ``names``."""
    with pytest.raises(ValueError) as info:
        load_pretrained(path, with_tokenizer=False)
    msg = str(info.value)
    assert "config.json" in msg, msg
    for name in names:
        assert name in msg, f"{name!r} not in: {msg}"
    return msg


# ---- Llama family: biases --------------------------------------------------------------------------

def test_llama_attention_bias_on_q_k_v_and_o(tmp_path):
    """LlamaAttention: bias=config.attention_bias on all four projections (field report)."""
    d = _save_decoder(tmp_path / "m", attention_bias=True)
    model, _, _ = _compare_decoder(d)
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_llama_mlp_bias(tmp_path):
    _compare_decoder(_save_decoder(tmp_path / "m", mlp_bias=True))


def test_mistral_has_no_biases_whatever_the_config_says(tmp_path):
    """MistralAttention / MistralMLP are bias-free; attention_bias/mlp_bias are not read."""
    d = _save_decoder(tmp_path / "m", "mistral", sliding_window=None)
    _edit(d, attention_bias=True, mlp_bias=True)
    model, _, _ = _compare_decoder(d)
    assert model.model.layers[0].self_attn.q_proj.bias is None


def test_qwen2_biases_on_q_k_v_only(tmp_path):
    d = _save_decoder(tmp_path / "m", "qwen2")
    model, _, _ = _compare_decoder(d)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None


# ---- sliding windows -------------------------------------------------------------------------------

def test_mistral_sliding_window_matches_torch(tmp_path):
    """Window 3 on a 12-token sequence: i attends j iff 0 <= i - j < 3 (masking_utils)."""
    d = _save_decoder(tmp_path / "m", "mistral", sliding_window=3)
    _, ours, _ = _compare_decoder(d)
    full = _save_decoder(tmp_path / "full", "mistral", sliding_window=None)
    ids, mask = _batch()
    ref_full = _torch_logits(full, dict(input_ids=ids, attention_mask=mask))
    assert np.abs(ours - ref_full)[mask > 0].max() > 1e-3, "the window should matter"


def test_mistral_sliding_window_defaults_to_4096():
    """MistralConfig.sliding_window defaults to 4096 when config.json has no such key."""
    cfg = config_from_hf({"model_type": "mistral", **TINY})
    assert cfg.sliding_window == 4096 and cfg.is_sliding(0) and cfg.is_sliding(1)
    cfg = config_from_hf({"model_type": "mistral", "sliding_window": None, **TINY})
    assert cfg.sliding_window is None and not cfg.is_sliding(0)


@pytest.mark.parametrize("kw", [
    dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    dict(use_sliding_window=True, sliding_window=4,
         layer_types=["sliding_attention", "full_attention"]),
], ids=["max_window_layers", "layer_types"])
def test_qwen2_sliding_layers_match_torch(tmp_path, kw):
    d = _save_decoder(tmp_path / "m", "qwen2", **kw)
    model, _, _ = _compare_decoder(d)
    hf = transformers.AutoConfig.from_pretrained(d)
    assert [model.config.is_sliding(i) for i in range(2)] == \
        [t == "sliding_attention" for t in hf.layer_types]


def test_qwen2_window_off_without_use_sliding_window():
    cfg = config_from_hf({"model_type": "qwen2", "sliding_window": 3, "max_window_layers": 0, **TINY})
    assert cfg.sliding_window is None and not any(cfg.is_sliding(i) for i in range(2))


def test_qwen2_sliding_layers_without_window_refused(tmp_path):
    d = _save_decoder(tmp_path / "m", "qwen2")
    _edit(d, use_sliding_window=False, layer_types=["full_attention", "sliding_attention"])
    _refused(d, "layer_types", "sliding_attention")


def test_qwen2_unknown_layer_type_refused(tmp_path):
    d = _save_decoder(tmp_path / "m", "qwen2")
    _edit(d, layer_types=["full_attention", "chunked_attention"])
    _refused(d, "layer_types", "chunked_attention")


# ---- rotary embeddings -----------------------------------------------------------------------------

ROPES = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(max_position_embeddings=8,  # the 12-token batch grows past it
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    "yarn": dict(max_position_embeddings=32,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0,
                                  "original_max_position_embeddings": 8, "rope_theta": 100.0}),
    "yarn_mscale": dict(max_position_embeddings=32,
                        rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0,
                                         "mscale_all_dim": 0.5, "truncate": False,
                                         "original_max_position_embeddings": 8}),
    "longrope": dict(max_position_embeddings=32,
                     rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 8,
                                      "short_factor": [1.0, 1.5, 2.0, 2.5],
                                      "long_factor": [2.0, 3.0, 5.0, 9.0]}),
    "llama3": dict(max_position_embeddings=64,
                   rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                    "rope_theta": 500.0}),
    "proportional": dict(rope_parameters={"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                          "factor": 2.0}),
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_types_match_torch(tmp_path, name):
    d = _save_decoder(tmp_path / "m", **ROPES[name])
    model, _, _ = _compare_decoder(d)
    cfg = model.config
    inv, att = rope_lib.rope_frequencies(cfg, 12)
    plain, _ = rope_lib.rope_frequencies(dataclasses.replace(cfg, rope_type="default"), 12)
    assert np.abs(np.asarray(inv) - np.asarray(plain)).max() > 1e-4 or att != 1.0, \
        f"{name}: the rope scaling should change the frequencies"


def test_transformers4_rope_scaling_with_legacy_type_key(tmp_path):
    """`rope_scaling: {"type": ...}` + top-level `rope_theta` (transformers 4 configs)."""
    d = _save_decoder(tmp_path / "m", rope_parameters={"rope_type": "linear", "factor": 3.0,
                                                       "rope_theta": 50.0})
    _edit(d, rope_parameters=None, rope_scaling={"type": "linear", "factor": 3.0}, rope_theta=50.0)
    model, _, _ = _compare_decoder(d)
    assert (model.config.rope_type, model.config.rope_factor, model.config.rope_theta) == \
        ("linear", 3.0, 50.0)


def test_top_level_original_max_position_embeddings_overrides(tmp_path):
    """standardize_rope_params: a top-level original_max_position_embeddings wins (llama3)."""
    d = _save_decoder(tmp_path / "m", **ROPES["llama3"])
    _edit(d, original_max_position_embeddings=4)
    model, _, _ = _compare_decoder(d)
    assert model.config.rope_original_max_position == 4


def test_llama3_original_max_position_defaults_to_max_position_embeddings():
    cfg = config_from_hf({"model_type": "llama", **TINY, "max_position_embeddings": 99,
                          "rope_parameters": {"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert cfg.rope_original_max_position == 99


def test_partial_rotary_factor_ignored_by_default_rope(tmp_path):
    """The family's own default rope ignores partial_rotary_factor: full rotation, as torch."""
    d = _save_decoder(tmp_path / "m", partial_rotary_factor=0.5)
    _compare_decoder(d)


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "su", "factor": 2.0}, "rope_parameters.rope_type"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "rope_parameters"),
    ({"full_attention": {"rope_type": "default"}}, "rope_parameters"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
     "rope_parameters.short_factor"),
], ids=["unknown-type", "partial-linear", "llama3-missing-key", "nested", "longrope-length"])
def test_unsupported_rope_refused(tmp_path, rope, field):
    d = _save_decoder(tmp_path / "m")
    _edit(d, rope_parameters=rope)
    _refused(d, field)


# ---- activations, shapes, norms, heads -------------------------------------------------------------

@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "swish"])
def test_hidden_act_matches_torch(tmp_path, act):
    _compare_decoder(_save_decoder(tmp_path / "m", hidden_act=act))


def test_unsupported_hidden_act_refused(tmp_path):
    d = _save_decoder(tmp_path / "m")
    _edit(d, hidden_act="quick_gelu")
    _refused(d, "hidden_act", "quick_gelu")


def test_head_dim_differing_from_hidden_over_heads(tmp_path):
    d = _save_decoder(tmp_path / "m", head_dim=16)
    model, _, _ = _compare_decoder(d)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)


def test_inert_and_training_only_fields(tmp_path):
    """rms_norm_eps is computed; pretraining_tp, attention_dropout (eval), ids, init are inert."""
    d = _save_decoder(tmp_path / "m", rms_norm_eps=0.5, pretraining_tp=2, attention_dropout=0.3,
                      initializer_range=0.5, pad_token_id=3, bos_token_id=4, eos_token_id=5,
                      use_cache=False)
    _edit(d, some_future_key={"a": 1}, auto_map={"AutoModel": "modeling_x.XModel"},
          torch_dtype="bfloat16")
    model, _, _ = _compare_decoder(d)
    assert model.config.rms_norm_eps == 0.5


def test_tied_embeddings(tmp_path):
    model, _, _ = _compare_decoder(_save_decoder(tmp_path / "m", tie_word_embeddings=True))
    assert model.lm_head is None


def test_tied_config_with_different_lm_head_loads_untied(tmp_path):
    """transformers 5 does not tie when the checkpoint's two tensors differ."""
    d = _save_decoder(tmp_path / "m", tie_word_embeddings=False)
    _edit(d, tie_word_embeddings=True)
    model, _, _ = _compare_decoder(d)
    assert model.lm_head is not None


def test_tied_checkpoint_with_only_lm_head(tmp_path):
    """Tying is symmetric on load: the embeddings may be saved as lm_head.weight only."""
    d = _save_decoder(tmp_path / "m", tie_word_embeddings=True)
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, f, metadata={"format": "pt"})
    model, _, _ = _compare_decoder(d)
    assert model.lm_head is None


@pytest.mark.parametrize("field, value", [("is_causal", False),
                                          ("quantization_config", {"quant_method": "gptq"})])
def test_refused_keys(tmp_path, field, value):
    d = _save_decoder(tmp_path / "m")
    _edit(d, **{field: value})
    _refused(d, field)


def test_kv_heads_not_dividing_heads_refused():
    with pytest.raises(ValueError, match=r"src\.json: num_key_value_heads=3"):
        config_from_hf({"model_type": "llama", **TINY, "num_key_value_heads": 3}, source="src.json")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_to_hf_config_roundtrip(model_type):
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, model_type=model_type)
    cfg = {"llama": LlamaConfig(**kw, attention_bias=True, o_proj_bias=True, rope_type="yarn",
                                rope_factor=4.0, rope_original_max_position=16),
           "mistral": LlamaConfig(**kw, sliding_window=5),
           "qwen2": LlamaConfig(**kw, attention_bias=True, sliding_window=5,
                                layer_types=("full_attention", "sliding_attention"))}[model_type]
    again = config_from_hf(llama_lib.to_hf_config(cfg))
    assert again == cfg
    hf = getattr(transformers, CLASSES[model_type]).from_dict(llama_lib.to_hf_config(cfg))
    assert hf.num_hidden_layers == 2


# ---- T5 --------------------------------------------------------------------------------------------

T5_TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
               dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _save_t5(path, seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**T5_TINY, **kw})).eval()
    model.save_pretrained(path)
    return str(path)


def _t5_inputs():
    ids, mask = _batch(10, seed=1)
    dec, dmask = _batch(6, seed=2)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dmask)


def _compare_t5(path, atol=ATOL, **load_kw):
    inputs = _t5_inputs()
    ref = _torch_logits(path, inputs, seq2seq=True)
    model, _ = load_pretrained(path, with_tokenizer=False, **load_kw)
    ours = np.asarray(model(*inputs.values()))
    real = inputs["decoder_attention_mask"] > 0
    assert np.isfinite(ours).all()
    err = float(np.abs(ours - ref)[real].max())
    assert err < _tol(ref, atol), f"{path}: max |jaxgrad - torch| = {err:.2e}"
    return model


@pytest.mark.parametrize("ff", ["relu", "gated-gelu", "gated-silu", "gated-relu", "gelu",
                                "gated-gelu_pytorch_tanh"])
def test_t5_feed_forward_proj_matches_torch(tmp_path, ff):
    model = _compare_t5(_save_t5(tmp_path / "m", feed_forward_proj=ff))
    assert model.config.is_gated_act == ff.startswith("gated")


def test_t5_dense_act_fn_and_is_gated_act_in_config_json_win(tmp_path):
    """T5Config.__post_init__ sets config.json's own dense_act_fn / is_gated_act last."""
    d = _save_t5(tmp_path / "m", feed_forward_proj="relu")
    _edit(d, feed_forward_proj="gated-gelu", dense_act_fn="relu", is_gated_act=False)
    model = _compare_t5(d)
    assert (model.config.dense_act_fn, model.config.is_gated_act) == ("relu", False)


def test_t5_relative_attention_buckets_and_epsilon(tmp_path):
    _compare_t5(_save_t5(tmp_path / "m", relative_attention_num_buckets=6,
                         relative_attention_max_distance=5, layer_norm_epsilon=0.3,
                         num_decoder_layers=3))


def test_t5_scale_decoder_outputs_from_tie_word_embeddings(tmp_path):
    """transformers 4 configs: tie_word_embeddings=false means no d_model**-0.5 scaling."""
    d = _save_t5(tmp_path / "m")
    _edit(d, scale_decoder_outputs=None, tie_word_embeddings=False)
    model = _compare_t5(d)
    assert model.lm_head is None and not model.config.scale_decoder_outputs


def test_t5_different_lm_head_loads_untied(tmp_path):
    """A checkpoint whose lm_head.weight differs from shared.weight is untied (transformers 5)."""
    d = _save_t5(tmp_path / "m", feed_forward_proj="gated-gelu")
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    tensors["lm_head.weight"] = np.random.default_rng(0).normal(
        size=tensors["shared.weight"].shape).astype(np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    model = _compare_t5(d)
    assert model.lm_head is not None


def test_t5_ignored_and_duplicate_tensors(tmp_path):
    """encoder.embed_tokens equal to shared is accepted, unequal refused; the cross-attention
    bias table transformers ignores is ignored."""
    d = _save_t5(tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = \
        np.ones((8, 4), np.float32)
    save_file(tensors, f, metadata={"format": "pt"})
    _compare_t5(d)
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"] + 1
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight differs"):
        load_pretrained(d, with_tokenizer=False)


def test_t5_attribute_map_alias_wins():
    cfg = config_from_hf({"model_type": "t5", **T5_TINY, "hidden_size": 48, "head_dim": 4})
    hf = transformers.T5Config.from_dict({"model_type": "t5", **T5_TINY, "hidden_size": 48,
                                          "head_dim": 4})
    assert (cfg.d_model, cfg.d_kv) == (hf.d_model, hf.d_kv) == (48, 4)


@pytest.mark.parametrize("changes, field", [
    (dict(feed_forward_proj="gated-gelu-x"), "feed_forward_proj"),
    (dict(feed_forward_proj="gated-quick_gelu"), "feed_forward_proj"),
    (dict(dense_act_fn="gelu_10"), "dense_act_fn"),
    (dict(is_causal=False), "is_causal"),
], ids=["malformed", "unsupported-act", "dense_act_fn", "is_causal"])
def test_t5_refusals(tmp_path, changes, field):
    d = _save_t5(tmp_path / "m")
    _edit(d, **{"dense_act_fn": None, "is_gated_act": None, **changes})  # None: key deleted
    _refused(d, field, repr(next(iter(changes.values()))))


# ---- the table, the doc and transformers agree -----------------------------------------------------

def _table(model_type):
    return t5_lib.HF_FIELDS if model_type == "t5" else llama_lib.HF_FIELDS[model_type]


def _transformers_class(model_type):
    return transformers.T5Config if model_type == "t5" else getattr(transformers, CLASSES[model_type])


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "t5"])
def test_table_covers_every_transformers_config_field_with_its_default(model_type):
    table = _table(model_type)
    for f in dataclasses.fields(_transformers_class(model_type)):
        assert f.name in table, f"{model_type}: transformers field {f.name!r} missing from HF_FIELDS"
        default = f.default if f.default is not dataclasses.MISSING else None
        assert table[f.name][0] == default, \
            f"{model_type}.{f.name}: table default {table[f.name][0]!r} vs transformers {default!r}"
    assert all(rule in hf_config.RULES for _, rule in table.values())


# Attribute reads the scan finds that are not config.json keys for these models: methods and
# class attributes, and masking helpers the model types here never call.
_NOT_KEYS = {"default_theta", "get_text_config", "json", "per_layer_config",
             "standardize_rope_params", "validate_rope", "_rope_type_labels",
             "attention_chunk_size"}  # create_chunked_causal_mask (Llama 4), not called here
_NOT_KEYS_T5 = _NOT_KEYS | {"num_labels",  # classification / QA heads only
                            "sliding_window", "layer_types"}  # masks T5Stack never builds
_READ = re.compile(r'config\.([A-Za-z]\w*)|(?:get|has)attr\((?:self\.)?config, "(\w+)"'
                   r'|(?:get|has)attr\(self, "(\w+)"')


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "t5"])
def test_every_key_transformers_reads_is_in_the_table(model_type):
    """The modeling code of the installed transformers reads no config attribute the table lacks:
    a key outside the table has no effect in transformers either (docs/config_fields.md)."""
    root = os.path.dirname(transformers.__file__)
    files = [f"models/{model_type}/modeling_{model_type}.py", "masking_utils.py"]
    if model_type != "t5":
        files.append("modeling_rope_utils.py")
    read = set()
    for f in files:
        for m in _READ.finditer(open(os.path.join(root, f)).read()):
            read.add(next(g for g in m.groups() if g))
    ignored = _NOT_KEYS_T5 if model_type == "t5" else _NOT_KEYS
    unknown = sorted(read - set(_table(model_type)) - ignored)
    assert not unknown, f"{model_type}: transformers reads {unknown}; add them to HF_FIELDS and the doc"


def _doc_rules():
    """{model_type: {key: rule}} from docs/config_fields.md's tables."""
    text = open(os.path.join(ROOT, "docs", "config_fields.md")).read()
    out = {t: {} for t in ("llama", "mistral", "qwen2", "t5")}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line
        m = re.match(r"\|\s*`([^`]+)`\s*\|(.*)", line)
        if not m or section is None:
            continue
        key, cells = m.group(1), [c.strip() for c in m.group(2).split("|")]
        if "Every model type" in section:
            for t in out:
                out[t][key] = cells[0]
        elif "Llama family" in section:
            for t, cell in zip(("llama", "mistral", "qwen2"), cells[:3]):
                if cell != "—":
                    out[t][key] = cell
        elif "T5" in section:
            out["t5"][key] = cells[0]
    return out


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "t5"])
def test_doc_lists_every_key_with_the_code_rule(model_type):
    doc = _doc_rules()[model_type]
    code = {k: rule for k, (_, rule) in _table(model_type).items()}
    assert doc == code, (f"{model_type}: doc-only {sorted(set(doc) - set(code))}, code-only "
                         f"{sorted(set(code) - set(doc))}, differing "
                         f"{sorted(k for k in set(doc) & set(code) if doc[k] != code[k])}")


# ---- kind 3: one dtype rule -------------------------------------------------------------------------

BAD_DTYPES = ["float16", jnp.float16, np.float16, "float64", np.float64, "int8", jnp.int32,
              "fp32", None]


def _bad_ids():
    return ["float16", "jnp.float16", "np.float16", "float64", "np.float64", "int8", "jnp.int32",
            "fp32", "None"]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=_bad_ids())
def test_unsupported_dtypes_refused_by_every_entry_point(bad):
    hf = json.load(open(os.path.join(fixture("tiny-t5"), "config.json")))
    small = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=4)
    calls = {
        "load_pretrained(dtype)": lambda: load_pretrained(fixture("tiny-t5"), dtype=bad),
        "config_from_hf(dtype)": lambda: config_from_hf(hf, dtype=bad),
        "config_from_hf(param_dtype)": lambda: config_from_hf(hf, param_dtype=bad),
        "LlamaConfig(dtype)": lambda: LlamaConfig(**small, dtype=bad),
        "T5Config(param_dtype)": lambda: T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8,
                                                  num_layers=1, num_decoder_layers=1,
                                                  num_heads=2, param_dtype=bad),
    }
    if bad is not None:  # param_dtype=None means the default, float32
        calls["load_pretrained(param_dtype)"] = lambda: load_pretrained(fixture("tiny-llama"),
                                                                        param_dtype=bad)
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        what = "param_dtype" if "param_dtype" in name else "dtype"
        assert f"{what}={bad!r}" in msg, f"{name}: {msg}"


def test_torch_dtype_refused():
    with pytest.raises(ValueError, match=r"dtype=torch.float16"):
        load_pretrained(fixture("tiny-llama"), dtype=torch.float16)


@pytest.mark.parametrize("good, want", [("bfloat16", jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16),
                                        (np.dtype("float32"), jnp.float32),
                                        (jnp.dtype("bfloat16"), jnp.bfloat16),
                                        (np.float32, jnp.float32)])
def test_supported_dtype_spellings(good, want):
    cfg = config_from_hf(json.load(open(os.path.join(fixture("tiny-llama"), "config.json"))),
                         dtype=good, param_dtype=good)
    assert cfg.dtype is want and cfg.param_dtype is want


def test_t5_large_activations_finite_in_bfloat16(tmp_path):
    """The float16 field report's checkpoint (a feed-forward output above 65504): refused in
    float16, finite and close to torch's float32 in bfloat16 (float32's range)."""
    d = _save_t5(tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    tensors["encoder.block.0.layer.1.DenseReluDense.wo.weight"] *= 45000.0
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"dtype='float16'"):
        load_pretrained(d, dtype="float16", with_tokenizer=False)
    inputs = _t5_inputs()
    ref = _torch_logits(d, inputs, seq2seq=True)
    model, _ = load_pretrained(d, dtype="bfloat16", with_tokenizer=False)
    ours = np.asarray(model(*inputs.values()))
    real = inputs["decoder_attention_mask"] > 0
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref)[real].max() < 0.05 * np.abs(ref).max() + 0.05


# ---- kind 11: no deprecation warnings from jaxgrad --------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-t5", "tiny-flan-t5"])
def test_loading_emits_no_deprecation_warnings_from_jaxgrad(name, tmp_path):
    from jaxgrad.models import save_pretrained

    package = os.path.join(ROOT, "jaxgrad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_pretrained(fixture(name), with_tokenizer=False, lora=LoraConfig(rank=2))
        save_pretrained(model, tmp_path / "out", json.load(open(os.path.join(fixture(name),
                                                                             "config.json"))))
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and os.path.abspath(w.filename).startswith(package)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


@pytest.mark.parametrize("model_type,key", [("llama", "hidden_act"), ("t5", "dense_act_fn")])
def test_an_activation_that_is_not_a_name_is_refused_by_name(model_type, key):
    from jaxgrad.models.hub import config_from_hf

    cfg = ({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4}
           if model_type == "llama" else
           {"model_type": "t5", "vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64,
            "num_layers": 2, "num_heads": 4})
    cfg[key] = ["silu"]
    with pytest.raises(ValueError, match=f"{key}=\\['silu'\\] is not supported"):
        config_from_hf(cfg)
