"""Flax NNX decoder for the Llama family: Llama 2/3, TinyLlama, Mistral (full attention), Qwen2.

Attribute names follow Hugging Face's ``LlamaForCausalLM`` so that module paths equal safetensors
keys (``model.layers.3.mlp.down_proj.weight``). One module covers the family; the differences are
config fields:

- grouped-query attention (``num_key_value_heads``), explicit ``head_dim`` when the config has one;
- RoPE with ``rope_theta`` and ``rope_scaling`` (transformers 4) or ``rope_parameters``
  (transformers 5); scaling types ``default``, ``linear`` and ``llama3``;
- q/k/v biases (Qwen2 always; Llama when ``attention_bias``), MLP biases (``mlp_bias``);
- tied or untied output embeddings (``tie_word_embeddings``).

Mistral's sliding window is not applied (full attention): identical to Hugging Face for sequences
no longer than the window (4096 for Mistral 7B v0.1; v0.2+ has none).

Call: ``model(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]`` (float32). The
attention mask is causal combined with key padding; positions are ``0..L-1`` as in Hugging Face for
right-padded batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrad.models.layers import Embed, Linear, RMSNorm, mask_value, split_rng

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @classmethod
    def from_hf(cls, cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32) -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dictionary."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig: model_type {model_type!r} is not a Llama-family type; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        # Rope: transformers 5 writes `rope_parameters`; 4.x writes `rope_theta` + `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        params = {**scaling, **rope}
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"LlamaConfig: rope type {rope_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"LlamaConfig: hidden_act {act!r} is not supported (expected 'silu')")
        qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_type=rope_type,
            rope_factor=float(params.get("factor", 1.0)),
            rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(params.get("original_max_position_embeddings", 8192)),
            attention_bias=qkv_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=act,
            model_type=model_type,
            dtype=dtype,
            param_dtype=param_dtype,
        )


def to_hf_config(cfg: LlamaConfig) -> dict:
    """The Hugging Face ``config.json`` dictionary of ``cfg`` (inverse of ``from_hf``)."""
    if cfg.rope_type != "default":
        rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_position}
    else:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["Qwen2ForCausalLM" if cfg.model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
        "rope_theta": cfg.rope_theta, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": cfg.hidden_act, "max_position_embeddings": 2048, "dtype": "float32",
    }


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies ``[head_dim // 2]`` after the configured scaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, L, H, Dh]`` by half-split RoPE (Hugging Face's ``rotate_half`` layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, nh, nkv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Linear(h, nh * dh, use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(h, nkv * dh, use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(h, nkv * dh, use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(nh * dh, h, use_bias=False, **kw)

    def __call__(self, x, cos, sin, mask_BxLxL, dropout_rng=None):
        cfg = self.cfg
        b, l, _ = x.shape
        nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rq, rk, rv, ro = split_rng(dropout_rng, 4)
        q = self.q_proj(x, rq).reshape(b, l, nh, dh)
        k = self.k_proj(x, rk).reshape(b, l, nkv, dh)
        v = self.v_proj(x, rv).reshape(b, l, nkv, dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        groups = nh // nkv
        q = q.reshape(b, l, nkv, groups, dh)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / math.sqrt(dh)
        scores = jnp.where(mask_BxLxL[:, None, None], scores, mask_value(jnp.float32))
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, l, nh * dh)
        return self.o_proj(out, ro)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x, dropout_rng=None):
        rg, ru, rd = split_rng(dropout_rng, 3)
        return self.down_proj(jax.nn.silu(self.gate_proj(x, rg)) * self.up_proj(x, ru), rd)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        norm_kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, dropout_rng=None):
        ra, rm = split_rng(dropout_rng, 2)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, ra)
        return x + self.mlp(self.post_attention_layernorm(x), rm)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, attention_mask=None, dropout_rng=None):
        cfg = self.cfg
        b, l = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, l), jnp.int32)
        causal = jnp.tril(jnp.ones((l, l), bool))
        mask = causal[None] & (attention_mask[:, None, :] > 0)
        pos = jnp.arange(l, dtype=jnp.float32)
        freqs = pos[:, None] * rope_inv_freq(cfg)[None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos = jnp.cos(emb)[None, :, None, :].astype(cfg.dtype)
        sin = jnp.sin(emb)[None, :, None, :].astype(cfg.dtype)
        x = self.embed_tokens(input_ids)
        for layer, r in zip(self.layers, split_rng(dropout_rng, len(self.layers))):
            x = layer(x, cos, sin, mask, r)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """Causal LM head over :class:`LlamaModel`; returns float32 logits ``[B, L, V]``."""

    is_encoder_decoder = False

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = LlamaModel(cfg, rngs=rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, *, dropout_rng=None) -> jax.Array:
        h = self.model(input_ids, attention_mask, dropout_rng)
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)
