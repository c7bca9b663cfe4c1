"""Flax NNX encoder–decoder for T5 v1.0 (ReLU) and T5 v1.1 / Flan-T5 (gated GELU).

Attribute names follow Hugging Face's ``T5ForConditionalGeneration`` (``encoder.block.0.layer.0
.SelfAttention.q.weight``, ``decoder.block.2.layer.1.EncDecAttention.k.weight``, ...), so module
paths equal safetensors keys. What the config decides (read as transformers 5's
``models/t5/configuration_t5.py`` and ``modeling_t5.py`` read it):

- the feed-forward: ``dense_act_fn`` and ``is_gated_act``, derived from ``feed_forward_proj``
  (``relu``: ``wi``, ``wo``; ``gated-gelu``: ``wi_0``, ``wi_1``, ``wo`` with ``gelu_new``, the
  tanh-approximated GELU; ``gated-<act>`` / ``<act>`` for the other activations of
  :data:`jaxgrad.models.hf_config.ACTIVATIONS`), unless config.json states them itself (it then wins,
  as in ``T5Config.__post_init__``);
- decoder outputs scaled by ``d_model ** -0.5`` before the head (``scale_decoder_outputs``;
  transformers 4 configs imply it by ``tie_word_embeddings``, false for v1.1 / Flan-T5);
- the head: transformers 5 ties ``lm_head`` to ``shared`` unless the checkpoint carries an
  ``lm_head.weight`` that differs; the loader (``jaxgrad.models.hub``) decides the same way;
- relative-position buckets (bidirectional in the encoder, causal in the decoder), one learned bias
  table per stack held by its first block, shared by all blocks of the stack.

Every config.json key falls under one rule of :data:`HF_FIELDS` (``docs/config_fields.md``).
T5 attention has no 1/√d scaling (it is folded into the initialisation). Dropout of the base model
(``dropout_rate``) is not applied: fine-tuning here trains LoRA adapters, whose own dropout is
applied when a ``dropout_rng`` is given. Compute dtypes are float32 and bfloat16 only
(:func:`jaxgrad.models.hf_config.resolve_dtype`): in float16 T5's activations overflow.

Call: ``model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> logits``
(float32 ``[B, T, V]``). :func:`shift_right` builds decoder inputs from labels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrad.models.layers import Embed, Linear, RMSNorm, mask_value, split_rng
from jaxgrad.models.hf_config import (ACTIVATIONS, GENERIC_EXTRAS, GENERIC_FIELDS, Reader,
                                      check_option, field_table, resolve_config_dtypes)


# T5Config.attribute_map aliases: a value under one of these names wins
ATTRIBUTE_MAP = {"hidden_size": "d_model", "num_attention_heads": "num_heads",
                 "num_hidden_layers": "num_layers", "head_dim": "d_kv"}
# config.json key -> (transformers' default, rule); class fields of the installed T5Config plus
# the keys modeling_t5.py reads (rules: jaxgrad.models.hf_config.RULES).
HF_FIELDS: dict[str, tuple[Any, str]] = field_table(
    GENERIC_FIELDS, GENERIC_EXTRAS,
    computed=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                  num_decoder_layers=None, num_heads=8, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                  feed_forward_proj="relu",
                  pad_token_id=0,  # decoder inputs from labels (shift_right)
                  # not T5Config fields, read by T5Config.__post_init__ / modeling_t5.py:
                  tie_word_embeddings=None, scale_decoder_outputs=None, dense_act_fn=None,
                  is_gated_act=None, decoder_start_token_id=None,
                  **dict.fromkeys(ATTRIBUTE_MAP)),
    not_applied=dict(dropout_rate=0.1),
    inert=dict(initializer_factor=1.0, is_encoder_decoder=True, use_cache=True, eos_token_id=1,
               classifier_dropout=0.0,  # classification heads only
               is_decoder=False))  # set per stack by T5ForConditionalGeneration


def feed_forward_from_proj(feed_forward_proj: str) -> tuple[str, bool]:
    """``(dense_act_fn, is_gated_act)`` as ``T5Config.__post_init__`` derives them; ValueError
    for a malformed value (``validate_architecture``)."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 1 and parts[0] != "gated" or len(parts) > 2:
        raise ValueError(f"feed_forward_proj={feed_forward_proj!r} is not `gated-<act>` or `<act>`")
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    return act, parts[0] == "gated"


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    decoder_start_token_id: int = 0
    dense_act_fn: str | None = None  # None: from feed_forward_proj
    is_gated_act: bool | None = None  # None: from feed_forward_proj
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        set_ = object.__setattr__
        resolve_config_dtypes(self)
        act, gated = feed_forward_from_proj(self.feed_forward_proj)
        if self.dense_act_fn is None:
            set_(self, "dense_act_fn", act)
        if self.is_gated_act is None:
            set_(self, "is_gated_act", gated)
        set_(self, "is_gated_act", bool(self.is_gated_act))
        check_option("T5Config", "dense_act_fn", self.dense_act_fn, ACTIVATIONS)

    @property
    def is_gated(self) -> bool:
        return self.is_gated_act

    @property
    def activation(self) -> str:
        return self.dense_act_fn

    @classmethod
    def from_hf(cls, cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32,
                source: str = "config.json") -> "T5Config":
        """Build from a Hugging Face ``config.json`` dictionary (transformers 5 semantics).

        Missing keys take T5Config's defaults; values jaxgrad does not compute exactly raise
        ValueError naming ``source``, the key and its value.
        """
        # T5Config.attribute_map: the alias, when present, is what is set last
        get = Reader(cfg, HF_FIELDS, source, aliases=ATTRIBUTE_MAP)
        get.check_refused()
        ff = get("feed_forward_proj")
        try:
            act, gated = feed_forward_from_proj(str(ff))
        except ValueError:
            get.refuse("feed_forward_proj", ff, "expected `gated-<act>` or `<act>`")
        act_field = "feed_forward_proj"
        # config.json's own values win over the derived ones (set after them in __post_init__)
        if "dense_act_fn" in cfg:
            act, act_field = cfg["dense_act_fn"], "dense_act_fn"
        if "is_gated_act" in cfg:
            gated = bool(cfg["is_gated_act"])
        if not isinstance(act, str) or act not in ACTIVATIONS:
            get.refuse(act_field, cfg.get(act_field),
                       f"activation {act!r}; supported: {', '.join(ACTIVATIONS)}")
        tied = cfg.get("tie_word_embeddings") is not False
        scale = bool(cfg["scale_decoder_outputs"]) if "scale_decoder_outputs" in cfg else tied
        num_layers = get.field("num_layers")[0]
        return cls(
            **get.values("vocab_size", "d_model", "d_kv", "d_ff", "num_heads",
                         "relative_attention_num_buckets", "relative_attention_max_distance"),
            num_layers=num_layers,
            num_decoder_layers=get("num_decoder_layers") or num_layers,
            layer_norm_epsilon=float(get("layer_norm_epsilon")),
            feed_forward_proj=str(ff),
            # transformers 5 always ties; whether the checkpoint unties is the loader's business.
            # tie_word_embeddings=false (transformers 4 configs of v1.1 / Flan-T5) means: no
            # output scaling, unless scale_decoder_outputs says otherwise.
            tie_word_embeddings=tied,
            scale_decoder_outputs=scale,
            pad_token_id=get("pad_token_id") or 0,
            decoder_start_token_id=get("decoder_start_token_id") or 0,
            dense_act_fn=act,
            is_gated_act=gated,
            dtype=dtype,
            param_dtype=param_dtype,
        )


def relative_position_bucket(rel_pos: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """T5's bucketing of ``key_pos - query_pos``: exact for small offsets, log-spaced beyond."""
    buckets = jnp.zeros_like(rel_pos)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel_pos > 0).astype(rel_pos.dtype) * num_buckets
        rel_pos = jnp.abs(rel_pos)
    else:
        rel_pos = -jnp.minimum(rel_pos, 0)
    max_exact = num_buckets // 2
    is_small = rel_pos < max_exact
    safe = jnp.maximum(rel_pos, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(rel_pos.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rel_pos, large)


def shift_right(labels: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """Decoder inputs from labels: prepend the start token, drop the last, map -100 to pad
    (``transformers``' ``T5PreTrainedModel._shift_right``).

    Args:
      labels: [..., L] int token ids, -100 marking ignored positions.
      decoder_start_token_id: the id put first (T5: the pad id, 0).
      pad_token_id: the id that replaces -100.

    Returns:
      [..., L] decoder input ids, ``labels``' dtype.
    """
    shifted = jnp.concatenate(
        [jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype), labels[..., :-1]],
        axis=-1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, *, has_relative_bias: bool, bidirectional: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.bidirectional = bidirectional
        inner = cfg.num_heads * cfg.d_kv
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q = Linear(cfg.d_model, inner, **kw)
        self.k = Linear(cfg.d_model, inner, **kw)
        self.v = Linear(cfg.d_model, inner, **kw)
        self.o = Linear(inner, cfg.d_model, **kw)
        if has_relative_bias:
            self.relative_attention_bias = Embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                param_dtype=cfg.param_dtype, rngs=rngs)
        else:
            self.relative_attention_bias = nnx.data(None)

    def position_bias(self, q_len: int, k_len: int) -> jax.Array:
        """``[1, H, q_len, k_len]`` learned bias from the bucketed relative positions."""
        rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
        buckets = relative_position_bucket(rel, self.bidirectional,
                                           self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x, kv, bias_1xHxQxK, mask_BxQxK, dropout_rng=None):
        cfg = self.cfg
        b, lq, _ = x.shape
        lk = kv.shape[1]
        h, d = cfg.num_heads, cfg.d_kv
        rq, rk, rv, ro = split_rng(dropout_rng, 4)
        q = self.q(x, rq).reshape(b, lq, h, d)
        k = self.k(kv, rk).reshape(b, lk, h, d)
        v = self.v(kv, rv).reshape(b, lk, h, d)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if bias_1xHxQxK is not None:
            scores = scores + bias_1xHxQxK
        scores = jnp.where(mask_BxQxK[:, None], scores, mask_value(jnp.float32))
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, h * d)
        return self.o(out, ro)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, has_relative_bias: bool, bidirectional: bool, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, has_relative_bias=has_relative_bias,
                                         bidirectional=bidirectional, rngs=rngs)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype)

    def __call__(self, x, bias, mask, dropout_rng=None):
        h = self.layer_norm(x)
        return x + self.SelfAttention(h, h, bias, mask, dropout_rng)


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.EncDecAttention = T5Attention(cfg, has_relative_bias=False, bidirectional=True, rngs=rngs)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype)

    def __call__(self, x, enc, mask, dropout_rng=None):
        return x + self.EncDecAttention(self.layer_norm(x), enc, None, mask, dropout_rng)


class T5DenseFF(nnx.Module):
    """``DenseReluDense``: relu (wi, wo) or gated (wi_0, wi_1, wo)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if cfg.is_gated:
            self.wi_0 = Linear(cfg.d_model, cfg.d_ff, **kw)
            self.wi_1 = Linear(cfg.d_model, cfg.d_ff, **kw)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff, **kw)
        self.wo = Linear(cfg.d_ff, cfg.d_model, **kw)

    def _act(self, x):
        return ACTIVATIONS[self.cfg.dense_act_fn](x)  # ACT2FN[config.dense_act_fn]

    def __call__(self, x, dropout_rng=None):
        r0, r1, r2 = split_rng(dropout_rng, 3)
        if self.cfg.is_gated:
            h = self._act(self.wi_0(x, r0)) * self.wi_1(x, r1)
        else:
            h = self._act(self.wi(x, r0))
        return self.wo(h, r2)


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseFF(cfg, rngs=rngs)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype)

    def __call__(self, x, dropout_rng=None):
        return x + self.DenseReluDense(self.layer_norm(x), dropout_rng)


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, *, is_decoder: bool, has_relative_bias: bool, rngs: nnx.Rngs):
        self.is_decoder = is_decoder
        layers = [T5LayerSelfAttention(cfg, has_relative_bias=has_relative_bias,
                                       bidirectional=not is_decoder, rngs=rngs)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(cfg, rngs=rngs))
        layers.append(T5LayerFF(cfg, rngs=rngs))
        self.layer = nnx.List(layers)

    def __call__(self, x, bias, mask, enc=None, enc_mask=None, dropout_rng=None):
        rs = split_rng(dropout_rng, 3)
        x = self.layer[0](x, bias, mask, rs[0])
        if self.is_decoder:
            x = self.layer[1](x, enc, enc_mask, rs[1])
        return self.layer[-1](x, rs[2])


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, *, is_decoder: bool, rngs: nnx.Rngs):
        self.is_decoder = is_decoder
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.block = nnx.List([T5Block(cfg, is_decoder=is_decoder, has_relative_bias=(i == 0), rngs=rngs)
                               for i in range(n)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype)

    def __call__(self, x, attention_mask, enc=None, enc_mask=None, dropout_rng=None):
        l = x.shape[1]
        mask = jnp.broadcast_to(attention_mask[:, None, :] > 0, (x.shape[0], l, l))
        if self.is_decoder:
            mask = mask & jnp.tril(jnp.ones((l, l), bool))[None]
        bias = self.block[0].layer[0].SelfAttention.position_bias(l, l)
        cross_mask = None
        if enc is not None:
            cross_mask = jnp.broadcast_to(enc_mask[:, None, :] > 0, (x.shape[0], l, enc.shape[1]))
        for blk, r in zip(self.block, split_rng(dropout_rng, len(self.block))):
            x = blk(x, bias, mask, enc, cross_mask, r)
        return self.final_layer_norm(x)


class T5ForConditionalGeneration(nnx.Module):
    """T5 encoder–decoder with LM head; returns float32 logits ``[B, T, V]``."""

    is_encoder_decoder = True
    # the family's checkpoint and LoRA names (jaxgrad.models.hub, jaxgrad.models.lora)
    BASE_PREFIX = ""  # keys are the model's own
    EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    # T5ForConditionalGeneration._keys_to_ignore_on_load_unexpected
    IGNORED_KEYS = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)
    OUTPUT_HEAD = "lm_head"
    LORA_TARGETS = ("q", "k", "v")  # the paper's q, k, v (self- and cross-attention)
    PEFT_TARGETS = ("q", "v")  # peft's mapping for t5

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.shared = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            rngs=rngs, std=1.0)
        self.encoder = T5Stack(cfg, is_decoder=False, rngs=rngs)
        self.decoder = T5Stack(cfg, is_decoder=True, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype, rngs=rngs)

    def encode(self, input_ids, attention_mask=None, dropout_rng=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return self.encoder(self.shared(input_ids), attention_mask, dropout_rng=dropout_rng)

    def decode(self, enc, attention_mask, decoder_input_ids, decoder_attention_mask=None,
               dropout_rng=None):
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones(decoder_input_ids.shape, jnp.int32)
        h = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, enc, attention_mask,
                         dropout_rng=dropout_rng)
        if self.config.scale_decoder_outputs:
            h = h * (self.config.d_model ** -0.5)
        if self.lm_head is None:
            logits = self.shared.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, *, dropout_rng=None) -> jax.Array:
        if decoder_input_ids is None:
            raise ValueError("T5ForConditionalGeneration: decoder_input_ids is required "
                             "(build it from labels with jaxgrad.models.t5.shift_right)")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        r_enc, r_dec = split_rng(dropout_rng, 2)
        enc = self.encode(input_ids, attention_mask, r_enc)
        return self.decode(enc, attention_mask, decoder_input_ids, decoder_attention_mask, r_dec)
