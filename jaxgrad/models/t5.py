"""Flax NNX encoder–decoder for T5 v1.0 (ReLU) and T5 v1.1 / Flan-T5 (gated GELU).

Attribute names follow Hugging Face's ``T5ForConditionalGeneration`` (``encoder.block.0.layer.0
.SelfAttention.q.weight``, ``decoder.block.2.layer.1.EncDecAttention.k.weight``, ...), so module
paths equal safetensors keys. What the config decides:

- feed-forward ``relu`` (v1.0: ``wi``, ``wo``) or ``gated-gelu`` (v1.1 / Flan: ``wi_0``, ``wi_1``,
  ``wo``, tanh-approximated GELU);
- tied head (``lm_head`` = ``shared``) or untied (v1.1 / Flan-T5 configs written by transformers
  4); decoder outputs scaled by ``d_model ** -0.5`` before the head for v1.0 (transformers 5 writes
  this as ``scale_decoder_outputs``; transformers 4 implies it by ``tie_word_embeddings``);
- relative-position buckets (bidirectional in the encoder, causal in the decoder), one learned bias
  table per stack held by its first block, shared by all blocks of the stack.

T5 attention has no 1/√d scaling (it is folded into the initialisation). Dropout of the base model
is not applied: fine-tuning here trains LoRA adapters, whose own dropout is applied when a
``dropout_rng`` is given.

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

SUPPORTED_FEED_FORWARD = ("relu", "gated-gelu", "gated-relu", "gated-silu")


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
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32) -> "T5Config":
        ff = cfg.get("feed_forward_proj", "relu")
        if ff not in SUPPORTED_FEED_FORWARD:
            raise ValueError(f"T5Config: feed_forward_proj {ff!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_FEED_FORWARD)}")
        return cls(
            vocab_size=cfg["vocab_size"],
            d_model=cfg["d_model"],
            d_kv=cfg["d_kv"],
            d_ff=cfg["d_ff"],
            num_layers=cfg["num_layers"],
            num_decoder_layers=cfg.get("num_decoder_layers") or cfg["num_layers"],
            num_heads=cfg["num_heads"],
            relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=ff,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            # transformers 5 always ties and records the v1.0 scaling separately; transformers 4
            # configs signal both with tie_word_embeddings (False for v1.1 / Flan-T5).
            scale_decoder_outputs=bool(cfg.get("scale_decoder_outputs",
                                               cfg.get("tie_word_embeddings", True))),
            pad_token_id=cfg.get("pad_token_id", 0) or 0,
            decoder_start_token_id=cfg.get("decoder_start_token_id", 0) or 0,
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
    """Decoder inputs from labels: prepend the start token, drop the last, map -100 to pad."""
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
        name = self.cfg.activation
        if name == "gelu":  # transformers maps gated-gelu to gelu_new (tanh approximation)
            return jax.nn.gelu(x, approximate=True)
        if name == "silu":
            return jax.nn.silu(x)
        return jax.nn.relu(x)

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
