"""jaxgrad.models.t5: T5's config.json keys against transformers on tiny random models (feed-forward
projections and activations, relative attention buckets, tied and untied heads, ignored and
duplicate tensors, refusals), large activations finite in bfloat16, shift_right, and the committed
Flan-T5 fixture read from a transformers 4 config.json."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra installs torch (CPU) and transformers: references, never skipped
import transformers
from safetensors.numpy import load_file, save_file

from helpers.models import (ATOL, CONFIG_ATOL, batch, copy_fixture, edit_config, max_err, reference,
                            refused, run, tol, torch_logits)
from jaxgrad.models import config_from_hf, load_pretrained, shift_right


T5_TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
               dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _save_t5(path, seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**T5_TINY, **kw})).eval()
    model.save_pretrained(path)
    return str(path)


def _t5_inputs():
    ids, mask = batch(10, seed=1)
    dec, dmask = batch(6, seed=2)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                decoder_attention_mask=dmask)


def _compare_t5(path, atol=CONFIG_ATOL, **load_kw):
    inputs = _t5_inputs()
    ref = torch_logits(path, inputs, seq2seq=True)
    model, _ = load_pretrained(path, with_tokenizer=False, **load_kw)
    ours = np.asarray(model(*inputs.values()))
    real = inputs["decoder_attention_mask"] > 0
    assert np.isfinite(ours).all()
    err = float(np.abs(ours - ref)[real].max())
    assert err < tol(ref, atol), f"{path}: max |jaxgrad - torch| = {err:.2e}"
    return model


@pytest.mark.parametrize("ff", ["relu", "gated-gelu", "gated-silu", "gated-relu", "gelu",
                                "gated-gelu_pytorch_tanh"])
def test_t5_feed_forward_proj_matches_torch(tmp_path, ff):
    model = _compare_t5(_save_t5(tmp_path / "m", feed_forward_proj=ff))
    assert model.config.is_gated_act == ff.startswith("gated")


def test_t5_dense_act_fn_and_is_gated_act_in_config_json_win(tmp_path):
    """T5Config.__post_init__ sets config.json's own dense_act_fn / is_gated_act last."""
    d = _save_t5(tmp_path / "m", feed_forward_proj="relu")
    edit_config(d, feed_forward_proj="gated-gelu", dense_act_fn="relu", is_gated_act=False)
    model = _compare_t5(d)
    assert (model.config.dense_act_fn, model.config.is_gated_act) == ("relu", False)


def test_t5_relative_attention_buckets_and_epsilon(tmp_path):
    _compare_t5(_save_t5(tmp_path / "m", relative_attention_num_buckets=6,
                         relative_attention_max_distance=5, layer_norm_epsilon=0.3,
                         num_decoder_layers=3))


def test_t5_scale_decoder_outputs_from_tie_word_embeddings(tmp_path):
    """transformers 4 configs: tie_word_embeddings=false means no d_model**-0.5 scaling."""
    d = _save_t5(tmp_path / "m")
    edit_config(d, scale_decoder_outputs=None, tie_word_embeddings=False)
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
    edit_config(d, **{"dense_act_fn": None, "is_gated_act": None, **changes})  # None: key deleted
    refused(d, field, repr(next(iter(changes.values()))))


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
    ref = torch_logits(d, inputs, seq2seq=True)
    model, _ = load_pretrained(d, dtype="bfloat16", with_tokenizer=False)
    ours = np.asarray(model(*inputs.values()))
    real = inputs["decoder_attention_mask"] > 0
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref)[real].max() < 0.05 * np.abs(ref).max() + 0.05


def test_shift_right_matches_transformers():
    ref = reference("tiny-t5")
    ours = shift_right(jnp.asarray(ref["labels"]), 0, 0)
    np.testing.assert_array_equal(np.asarray(ours), ref["decoder_input_ids"])


def test_untied_flan_t5_config_from_transformers4(tmp_path):
    """Flan-T5 configs on the Hub say tie_word_embeddings=false and ship lm_head.weight."""
    d = copy_fixture("tiny-flan-t5", tmp_path)
    edit_config(d, tie_word_embeddings=False, scale_decoder_outputs=None)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["shared.weight"].copy()
    save_file(tensors, str(d / "model.safetensors"))
    model, _ = load_pretrained(str(d))
    assert model.lm_head is not None
    ref = reference("tiny-flan-t5")
    ours, mask = run(model, ref)
    assert max_err(ours, ref["logits"], mask) < ATOL
