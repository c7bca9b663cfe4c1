"""Rotary position embeddings (RoPE) as transformers computes them, for every family that rotates.

:func:`rope_from_hf` standardises a config.json's rope fields as transformers'
``PreTrainedConfig.convert_rope_params_to_dict`` / ``standardize_rope_params`` do, and
:func:`rope_to_hf` writes them back;
:func:`rope_frequencies` gives the inverse frequencies and attention factor of every rope type of
``modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (:data:`ROPE_TYPES`); :func:`apply_rope` rotates
queries and keys in Hugging Face's ``rotate_half`` layout. Llama, Gemma 3 and GPT-NeoX use them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxgrad.models.hf_config import refuse

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")

_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                  "longrope": ("short_factor", "long_factor"),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def rope_from_hf(cfg: dict, head_dim: int, max_pos: int, source: str) -> dict:
    """LlamaConfig's rope fields, standardised as ``PreTrainedConfig.convert_rope_params_to_dict``
    and ``standardize_rope_params`` (modeling_rope_utils.py) do it."""
    scaling = cfg.get("rope_scaling")
    field = "rope_scaling" if scaling else "rope_parameters"
    raw = scaling or cfg.get("rope_parameters") or {}  # rope_scaling, when set, wins entirely
    if not isinstance(raw, dict):
        refuse(source, field, raw, "expected a dictionary")
    if any(isinstance(v, dict) for v in raw.values()):
        refuse(source, field, raw, "per-layer-type rope parameters are not implemented")
    p = dict(raw)
    p.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if cfg.get("partial_rotary_factor") is not None:
        p.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    rope_type = p["rope_type"] if "rope_type" in p else p.get("type", "default")
    if rope_type not in ROPE_TYPES:
        refuse(source, f"{field}.rope_type", rope_type, f"supported: {', '.join(ROPE_TYPES)}")
    missing = [k for k in _ROPE_REQUIRED.get(rope_type, ()) if k not in p]
    if missing:
        refuse(source, field, raw, f"rope type {rope_type!r} needs {missing} (transformers "
               "raises KeyError too)")

    def number(key, value, allow_none=False):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            refuse(source, f"{field}.{key}", value, "expected a number")
        return float(value)

    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": number("rope_theta", p["rope_theta"])}
    partial = number("partial_rotary_factor", p.get("partial_rotary_factor", 1.0), True)
    partial = 1.0 if partial is None else partial
    if partial != 1.0 and rope_type not in ("default", "proportional"):
        # The default rope of Llama/Mistral/Qwen2 ignores it; these types shorten cos/sin to
        # int(head_dim * factor) and transformers fails on the shape mismatch.
        refuse(source, "partial_rotary_factor", partial,
               f"rope type {rope_type!r} with a partial rotary dimension fails in transformers")
    if rope_type == "default":
        return out
    if rope_type in ("llama3", "yarn", "longrope"):
        # standardize_rope_params: a top-level original_max_position_embeddings overrides.
        if "original_max_position_embeddings" in cfg:
            omp, omp_field = cfg["original_max_position_embeddings"], "original_max_position_embeddings"
        else:
            omp = p.get("original_max_position_embeddings", max_pos)
            omp_field = f"{field}.original_max_position_embeddings"
        if isinstance(omp, bool) or not isinstance(omp, (int, float)) or omp <= 0:
            refuse(source, omp_field, omp, "expected a positive number")
        out["rope_original_max_position"] = omp
    if rope_type == "proportional":  # _compute_proportional_rope_parameters: factor defaults to 1
        factor = number("factor", p.get("factor", 1.0))
    else:
        factor = number("factor", p.get("factor"), allow_none=rope_type in ("yarn", "longrope"))
    if factor is None:  # yarn / longrope: the ratio of the context lengths
        factor = max_pos / out["rope_original_max_position"]
    out["rope_factor"] = factor
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = number("low_freq_factor", p["low_freq_factor"])
        out["rope_high_freq_factor"] = number("high_freq_factor", p["high_freq_factor"])
    if rope_type in ("yarn", "longrope"):
        out["rope_attention_factor"] = number("attention_factor", p.get("attention_factor"), True)
    if rope_type == "yarn":
        out["rope_beta_fast"] = number("beta_fast", p.get("beta_fast") or 32)
        out["rope_beta_slow"] = number("beta_slow", p.get("beta_slow") or 1)
        out["rope_mscale"] = number("mscale", p.get("mscale"), True)
        out["rope_mscale_all_dim"] = number("mscale_all_dim", p.get("mscale_all_dim"), True)
        out["rope_truncate"] = bool(p.get("truncate", True))
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            values = p[key]
            if not isinstance(values, (list, tuple)) or len(values) != head_dim // 2:
                refuse(source, f"{field}.{key}", values,
                       f"expected a list of head_dim // 2 = {head_dim // 2} numbers")
            out[f"rope_{key}"] = tuple(number(key, v) for v in values)
    if rope_type == "proportional":
        out["rope_partial_rotary_factor"] = partial
    return out


def rope_to_hf(cfg) -> dict:
    """transformers' ``rope_parameters`` dictionary of a config's ``rope_*`` fields (those
    :func:`rope_from_hf` returns; the inverse of it)."""
    kind = cfg.rope_type
    out: dict[str, Any] = {"rope_type": kind, "rope_theta": cfg.rope_theta}
    if kind != "default":
        out["factor"] = cfg.rope_factor
    if kind == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor)
    if kind in ("llama3", "yarn", "longrope"):
        out["original_max_position_embeddings"] = cfg.rope_original_max_position
    if kind in ("yarn", "longrope") and cfg.rope_attention_factor is not None:
        out["attention_factor"] = cfg.rope_attention_factor
    if kind == "yarn":
        out.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                   truncate=cfg.rope_truncate)
        out.update({k: v for k, v in (("mscale", cfg.rope_mscale),
                                      ("mscale_all_dim", cfg.rope_mscale_all_dim)) if v is not None})
    if kind == "longrope":
        out.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor))
    if kind == "proportional":
        out["partial_rotary_factor"] = cfg.rope_partial_rotary_factor
    return out


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg, seq_len: int) -> tuple[jax.Array, float]:
    """``(inv_freq [head_dim // 2] float32, attention_factor)`` for a sequence of ``seq_len``.

    Matches transformers' ``ROPE_INIT_FUNCTIONS`` (modeling_rope_utils.py) and the model's own
    ``compute_default_rope_parameters``, in float32 as there. ``dynamic`` and ``longrope`` depend
    on the length as in ``dynamic_rope_update`` for a freshly loaded model (transformers keeps the
    longest dynamic length it has seen; jaxgrad uses each call's own).
    """
    dim, base, kind = cfg.head_dim, cfg.rope_theta, cfg.rope_type
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv = 1.0 / (base ** exponents)
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / cfg.rope_factor, 1.0
    if kind == "dynamic":
        if seq_len <= cfg.max_position_embeddings:
            return inv, 1.0
        factor, mpe = cfg.rope_factor, cfg.max_position_embeddings
        length = jnp.asarray(seq_len, jnp.float32)
        scaled = base * ((factor * length / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (scaled ** exponents), 1.0
    if kind == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor, omp = cfg.rope_factor, cfg.rope_original_max_position
        att = cfg.rope_attention_factor
        if att is None:
            if cfg.rope_mscale and cfg.rope_mscale_all_dim:
                att = _get_mscale(factor, cfg.rope_mscale) / _get_mscale(factor, cfg.rope_mscale_all_dim)
            else:
                att = _get_mscale(factor)

        def correction_dim(rotations):
            return (dim * math.log(omp / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = base ** exponents
        ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv, float(att)
    if kind == "longrope":
        factor, omp = cfg.rope_factor, cfg.rope_original_max_position
        att = cfg.rope_attention_factor
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omp))
        ext = cfg.rope_long_factor if seq_len > omp else cfg.rope_short_factor
        return 1.0 / (jnp.asarray(ext, jnp.float32) * base ** exponents), float(att)
    if kind == "proportional":
        angles = int(cfg.rope_partial_rotary_factor * dim // 2)
        rotated = 1.0 / (base ** (jnp.arange(0, 2 * angles, 2, dtype=jnp.float32) / dim))
        inv = jnp.concatenate([rotated, jnp.zeros((dim // 2 - angles,), jnp.float32)])
        return inv / cfg.rope_factor, 1.0
    raise ValueError(f"rope_type {kind!r} is not supported")


def rope_inv_freq(cfg, seq_len: int | None = None) -> jax.Array:
    """Inverse frequencies ``[head_dim // 2]`` after the configured scaling."""
    return rope_frequencies(cfg, cfg.max_position_embeddings if seq_len is None else seq_len)[0]


def rope_cos_sin(inv_freq: jax.Array, attention_factor: float, length: int,
                 dtype) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[1, L, 1, head_dim]`` in ``dtype``, for positions ``0..L-1`` and the
    inverse frequencies of :func:`rope_frequencies` (Hugging Face's layout: the angles twice)."""
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return ((jnp.cos(emb) * attention_factor)[None, :, None, :].astype(dtype),
            (jnp.sin(emb) * attention_factor)[None, :, None, :].astype(dtype))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, L, H, Dh]`` by half-split RoPE (Hugging Face's ``rotate_half`` layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)
