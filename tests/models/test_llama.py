"""jaxgrad.models.llama: the Llama family's config.json keys (llama, mistral, qwen2) against
transformers (issue 12, kind 1): biases, sliding windows, activations, shapes and tied embeddings
computed exactly (torch parity on tiny random models built here with transformers: vocab 64,
hidden 32, 2 layers) or refused with a ValueError naming the file, the field and its value;
to_hf_config round trips. The keys' tables are tests/models/test_hf_config.py's, rope
tests/models/test_rope.py's.

The torch reference is always ``from_pretrained`` of the very directory jaxgrad loads, so it
reads config.json the way a transformers user would. Padding positions are not compared.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from helpers.models import (CLASSES, TINY, batch, compare_decoder, edit_config, refused,
                            save_decoder, torch_logits)
from jaxgrad.models import LlamaConfig, config_from_hf, llama as llama_lib


def test_llama_attention_bias_on_q_k_v_and_o(tmp_path):
    """LlamaAttention: bias=config.attention_bias on all four projections (field report)."""
    d = save_decoder(tmp_path / "m", attention_bias=True)
    model, _, _ = compare_decoder(d)
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_llama_mlp_bias(tmp_path):
    compare_decoder(save_decoder(tmp_path / "m", mlp_bias=True))


def test_mistral_has_no_biases_whatever_the_config_says(tmp_path):
    """MistralAttention / MistralMLP are bias-free; attention_bias/mlp_bias are not read."""
    d = save_decoder(tmp_path / "m", "mistral", sliding_window=None)
    edit_config(d, attention_bias=True, mlp_bias=True)
    model, _, _ = compare_decoder(d)
    assert model.model.layers[0].self_attn.q_proj.bias is None


def test_qwen2_biases_on_q_k_v_only(tmp_path):
    d = save_decoder(tmp_path / "m", "qwen2")
    model, _, _ = compare_decoder(d)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_mistral_sliding_window_matches_torch(tmp_path):
    """Window 3 on a 12-token sequence: i attends j iff 0 <= i - j < 3 (masking_utils)."""
    d = save_decoder(tmp_path / "m", "mistral", sliding_window=3)
    _, ours, _ = compare_decoder(d)
    full = save_decoder(tmp_path / "full", "mistral", sliding_window=None)
    ids, mask = batch()
    ref_full = torch_logits(full, dict(input_ids=ids, attention_mask=mask))
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
    d = save_decoder(tmp_path / "m", "qwen2", **kw)
    model, _, _ = compare_decoder(d)
    hf = transformers.AutoConfig.from_pretrained(d)
    assert [model.config.is_sliding(i) for i in range(2)] == \
        [t == "sliding_attention" for t in hf.layer_types]


def test_qwen2_window_off_without_use_sliding_window():
    cfg = config_from_hf({"model_type": "qwen2", "sliding_window": 3, "max_window_layers": 0, **TINY})
    assert cfg.sliding_window is None and not any(cfg.is_sliding(i) for i in range(2))


def test_qwen2_sliding_layers_without_window_refused(tmp_path):
    d = save_decoder(tmp_path / "m", "qwen2")
    edit_config(d, use_sliding_window=False, layer_types=["full_attention", "sliding_attention"])
    refused(d, "layer_types", "sliding_attention")


def test_qwen2_unknown_layer_type_refused(tmp_path):
    d = save_decoder(tmp_path / "m", "qwen2")
    edit_config(d, layer_types=["full_attention", "chunked_attention"])
    refused(d, "layer_types", "chunked_attention")


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "swish"])
def test_hidden_act_matches_torch(tmp_path, act):
    compare_decoder(save_decoder(tmp_path / "m", hidden_act=act))


def test_unsupported_hidden_act_refused(tmp_path):
    d = save_decoder(tmp_path / "m")
    edit_config(d, hidden_act="quick_gelu")
    refused(d, "hidden_act", "quick_gelu")


def test_head_dim_differing_from_hidden_over_heads(tmp_path):
    d = save_decoder(tmp_path / "m", head_dim=16)
    model, _, _ = compare_decoder(d)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)


def test_inert_and_training_only_fields(tmp_path):
    """rms_norm_eps is computed; pretraining_tp, attention_dropout (eval), ids, init are inert."""
    d = save_decoder(tmp_path / "m", rms_norm_eps=0.5, pretraining_tp=2, attention_dropout=0.3,
                      initializer_range=0.5, pad_token_id=3, bos_token_id=4, eos_token_id=5,
                      use_cache=False)
    edit_config(d, some_future_key={"a": 1}, auto_map={"AutoModel": "modeling_x.XModel"},
          torch_dtype="bfloat16")
    model, _, _ = compare_decoder(d)
    assert model.config.rms_norm_eps == 0.5


def test_tied_embeddings(tmp_path):
    model, _, _ = compare_decoder(save_decoder(tmp_path / "m", tie_word_embeddings=True))
    assert model.lm_head is None


def test_tied_config_with_different_lm_head_loads_untied(tmp_path):
    """transformers 5 does not tie when the checkpoint's two tensors differ."""
    d = save_decoder(tmp_path / "m", tie_word_embeddings=False)
    edit_config(d, tie_word_embeddings=True)
    model, _, _ = compare_decoder(d)
    assert model.lm_head is not None


def test_tied_checkpoint_with_only_lm_head(tmp_path):
    """Tying is symmetric on load: the embeddings may be saved as lm_head.weight only."""
    d = save_decoder(tmp_path / "m", tie_word_embeddings=True)
    f = os.path.join(d, "model.safetensors")
    tensors = load_file(f)
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, f, metadata={"format": "pt"})
    model, _, _ = compare_decoder(d)
    assert model.lm_head is None


@pytest.mark.parametrize("field, value", [("is_causal", False),
                                          ("quantization_config", {"quant_method": "gptq"})])
def test_refused_keys(tmp_path, field, value):
    d = save_decoder(tmp_path / "m")
    edit_config(d, **{field: value})
    refused(d, field)


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
