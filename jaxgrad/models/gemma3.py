"""Flax NNX decoder for Gemma 3 text models (``model_type: gemma3_text``: Gemma 3 270M, 1B, and
the text towers of the larger ones saved as ``Gemma3ForCausalLM``).

Attribute names follow transformers 5's ``Gemma3ForCausalLM`` (``models/gemma3/modeling_gemma3.py``)
so that module paths equal safetensors keys (``model.layers.3.self_attn.q_norm.weight``). What is
computed, as there:

- the embedding scaled by ``sqrt(hidden_size)``, the scale rounded to the compute dtype first
  (``Gemma3TextScaledWordEmbedding``: ``embed_scale.to(weight.dtype)``; 55.4256 -> 55.5 in bfloat16);
- Gemma's RMSNorm ``x * (1 + w)`` in float32, cast back to the input dtype, four per layer
  (``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
  ``post_feedforward_layernorm``) and a final ``norm``;
- attention with grouped-query heads of ``head_dim``, RMSNorm on q and k per head (``q_norm``,
  ``k_norm``) before RoPE, scores scaled by ``query_pre_attn_scalar ** -0.5``, softmax in float32;
  ``attention_bias`` on q, k, v and o;
- interleaved layer types (``layer_types``, or the legacy ``sliding_window_pattern``: layer i
  slides unless ``(i + 1) % pattern == 0``): sliding layers attend to ``0 <= i - j < sliding_window``
  (``masking_utils.sliding_window_overlay``), full layers to every earlier token;
- one RoPE per layer type (``rope_parameters.{full_attention,sliding_attention}``; from a
  transformers-4 config.json: ``rope_theta`` for full layers, ``rope_local_base_freq`` for sliding
  ones, ``rope_scaling`` merged into the full layers' as ``Gemma3TextConfig`` does), of the types
  ``default``, ``linear``, ``yarn``, ``llama3`` (:func:`jaxgrad.models.rope.rope_frequencies`);
- a GELU-tanh gated MLP (``hidden_activation``, any of :data:`jaxgrad.models.hf_config.ACTIVATIONS`);
- tied (default) or untied output head, then ``final_logit_softcapping`` when set:
  ``tanh(logits / c) * c``.

Refused by name (``ValueError`` naming the file, the key and its value): bidirectional attention
(``use_bidirectional_attention``), ``attn_logit_softcapping`` (transformers 5.24's
``Gemma3Attention`` stores it but never passes it to the attention kernel, so it caps nothing,
unlike Gemma 2 and the original Gemma 3 code: jaxgrad neither guesses nor copies that), rope types
``dynamic``, ``longrope``, ``proportional``, and rope settings transformers silently ignores (a flat
``rope_parameters``, ``rope_scaling`` with only the legacy ``type`` key). Every key of a
config.json falls under one rule of :data:`HF_FIELDS` (docs/models/gemma3.md).

Call: ``model(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]`` (float32); positions
``0..L-1`` as in Hugging Face for right-padded batches.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrad._compat import moved_names
from jaxgrad.models.layers import (CausalLM, DecoderSizes, GatedMLP, Linear, causal_mask,
                                   decoder_stack, dot_product_attention, split_rng)
from jaxgrad.models.hf_config import (ACTIVATIONS, GENERIC_EXTRAS, GENERIC_FIELDS, Reader,
                                      check_option, field_table,
                                      resolve_config_dtypes)
from jaxgrad.models.rope import apply_rope, rope_cos_sin, rope_from_hf, rope_to_hf
from jaxgrad.models.rope import rope_frequencies as _llama_rope_frequencies

DOC = "docs/models/gemma3.md"  # refusals point to this family's table of config.json keys

MODEL_TYPE = "gemma3_text"
FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}  # Gemma3TextConfig.default_theta
DEFAULT_PATTERN = 6  # Gemma3TextConfig.__post_init__: kwargs.get("sliding_window_pattern", 6)

# ---- config.json keys -------------------------------------------------------------------------------

# config.json key -> (transformers' default, rule). The class fields and defaults are those of the
# installed transformers' Gemma3TextConfig (checked by tests/models/test_gemma3.py); the extras are the
# further keys Gemma3TextConfig.__post_init__ / convert_rope_params_to_dict and the modeling code read.
HF_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {MODEL_TYPE: field_table(
    GENERIC_FIELDS, GENERIC_EXTRAS,
    computed=dict(
        vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=131_072,  # yarn / llama3 defaults
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=None, attention_bias=False,
        query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
        final_logit_softcapping=None,
        # read by Gemma3TextConfig.__post_init__ / convert_rope_params_to_dict
        rope_theta=DEFAULT_THETA[FULL], rope_local_base_freq=DEFAULT_THETA[SLIDING],
        rope_scaling=None, sliding_window_pattern=DEFAULT_PATTERN,
        # standardize_rope_params, rerun by the rope functions of the scaled types, copies it
        # into every layer type's parameters: ignored by the default rope, refused with the
        # others (transformers fails on the shorter inv_freq)
        partial_rotary_factor=None),
    inert=dict(
        initializer_range=0.02, use_cache=True,
        pad_token_id=0,  # nn.Embedding padding_idx: gradients and init only
        eos_token_id=1, bos_token_id=2,
        # written by transformers 4 next to layer_types; __post_init__ reads
        # `sliding_window_pattern` and the stored attribute is never read again
        _sliding_window_pattern=DEFAULT_PATTERN,
        # the nested parameters take max_position_embeddings instead (tests/models/test_gemma3.py)
        original_max_position_embeddings=None),
    not_applied=dict(attention_dropout=0.0),
    refused=dict(attn_logit_softcapping=None, use_bidirectional_attention=False))}

_REFUSED_WHY = {
    "use_bidirectional_attention": "bidirectional attention (an embedding model's mask, with the "
                                   "sliding window halved) is not implemented",
    "attn_logit_softcapping": "transformers 5's Gemma3Attention stores it but never applies it (the "
                              "eager kernel's softcap argument is not passed), unlike Gemma 2 and "
                              "the original Gemma 3 code; jaxgrad refuses rather than guess",
}


# ---- the typed config ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """One layer type's rotary embedding (the fields of :class:`jaxgrad.models.llama.LlamaConfig`
    that :func:`jaxgrad.models.rope.rope_frequencies` reads)."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: float = 8192  # llama3, yarn
    rope_attention_factor: float | None = None  # yarn; None = transformers' formula
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_mscale: float | None = None  # yarn
    rope_mscale_all_dim: float | None = None  # yarn
    rope_truncate: bool = True  # yarn

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeSpec: rope_type={self.rope_type!r} is not supported for Gemma 3; "
                             f"supported: {', '.join(ROPE_TYPES)}")

    def to_hf(self) -> dict:
        """transformers' ``rope_parameters[layer_type]`` dictionary."""
        return rope_to_hf(self)


def default_layer_types(num_hidden_layers: int, pattern: int = DEFAULT_PATTERN) -> tuple[str, ...]:
    """Gemma3TextConfig's layer types for a ``sliding_window_pattern``: every ``pattern``-th layer
    (1-based) is full, the others slide."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_hidden_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig(DecoderSizes):
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    # per layer "full_attention" / "sliding_attention"; None: sliding_window_pattern 6
    layer_types: tuple[str, ...] | None = None
    full_rope: RopeSpec = RopeSpec(rope_theta=DEFAULT_THETA[FULL])
    sliding_rope: RopeSpec = RopeSpec(rope_theta=DEFAULT_THETA[SLIDING])
    max_position_embeddings: int = 131_072
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    model_type = MODEL_TYPE

    def __post_init__(self):
        resolve_config_dtypes(self)
        set_ = functools.partial(object.__setattr__, self)
        check_option("Gemma3TextConfig", "hidden_activation", self.hidden_activation, ACTIVATIONS)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Gemma3TextConfig: num_attention_heads={self.num_attention_heads} is "
                             f"not a multiple of num_key_value_heads={self.num_key_value_heads}")
        layer_types = (default_layer_types(self.num_hidden_layers) if self.layer_types is None
                       else tuple(self.layer_types))
        set_("layer_types", layer_types)
        bad = [t for t in layer_types if t not in LAYER_TYPES]
        if bad or len(layer_types) != self.num_hidden_layers:
            raise ValueError(f"Gemma3TextConfig: layer_types={layer_types!r} must list "
                             f"{self.num_hidden_layers} of {LAYER_TYPES}")
        if SLIDING in layer_types and self.sliding_window is None:
            raise ValueError("Gemma3TextConfig: sliding_attention layers need a sliding_window")
        for name in ("full_rope", "sliding_rope"):
            if not isinstance(getattr(self, name), RopeSpec):
                raise TypeError(f"Gemma3TextConfig: {name} must be a RopeSpec")

    def is_sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` attends through the sliding window."""
        return self.layer_types[layer] == SLIDING

    def rope(self, layer_type: str) -> RopeSpec:
        return self.full_rope if layer_type == FULL else self.sliding_rope

    @classmethod
    def from_hf(cls, cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32,
                source: str = "config.json") -> Gemma3TextConfig:
        """Build from a Hugging Face ``config.json`` dictionary (transformers 5 semantics).

        Missing keys take the defaults of transformers' ``Gemma3TextConfig``; keys that change the
        computation in a way jaxgrad does not reproduce raise ValueError naming ``source``, the
        key and its value.
        """
        model_type = cfg.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{source}: model_type={model_type!r} is not {MODEL_TYPE!r}")
        get = Reader(cfg, HF_FIELDS[MODEL_TYPE], source, doc=DOC)
        if cfg.get("use_bidirectional_attention"):  # null and false are both causal
            get.refuse("use_bidirectional_attention", cfg["use_bidirectional_attention"],
                       _REFUSED_WHY["use_bidirectional_attention"])
        if cfg.get("attn_logit_softcapping") is not None:
            get.refuse("attn_logit_softcapping", cfg["attn_logit_softcapping"],
                       _REFUSED_WHY["attn_logit_softcapping"])
        get.check_refused(skip=_REFUSED_WHY)
        n, hidden, heads, kv, head_dim = (get.positive_int(k) for k in (
            "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim"))
        if heads % kv:
            get.refuse("num_key_value_heads", kv,
                       f"num_attention_heads={heads} is not a multiple of it")
        if hidden % heads:  # Gemma3TextConfig.validate_architecture raises too
            get.refuse("num_attention_heads", heads,
                       f"hidden_size={hidden} is not a multiple of it")
        act = get.option("hidden_activation", ACTIVATIONS)
        scalar = get.number("query_pre_attn_scalar", positive=True)
        cap = get.number("final_logit_softcapping", positive=True, or_none=True)
        layer_types = _layer_types_from_hf(get, n)
        window = get.positive_int("sliding_window", or_none=True)
        if SLIDING in layer_types and window is None:
            get.refuse("sliding_window", window, "sliding_attention layers need a window")
        max_pos = get.positive_int("max_position_embeddings")
        ropes = _ropes_from_hf(get, head_dim, max_pos)
        return cls(
            vocab_size=get.positive_int("vocab_size"), hidden_size=hidden,
            intermediate_size=get.positive_int("intermediate_size"), num_hidden_layers=n,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps")), hidden_activation=act,
            query_pre_attn_scalar=scalar, sliding_window=window, layer_types=layer_types,
            full_rope=ropes[FULL], sliding_rope=ropes[SLIDING], max_position_embeddings=max_pos,
            attention_bias=bool(get("attention_bias")),
            final_logit_softcapping=None if cap is None else float(cap),
            tie_word_embeddings=bool(get("tie_word_embeddings")), dtype=dtype,
            param_dtype=param_dtype)


def _layer_types_from_hf(get: Reader, n: int) -> tuple[str, ...]:
    """``layer_types`` as Gemma3TextConfig.__post_init__ sets them."""
    layer_types = get("layer_types")
    if layer_types is None:
        return default_layer_types(n, get.positive_int("sliding_window_pattern"))
    if not isinstance(layer_types, (list, tuple)):
        get.refuse("layer_types", layer_types, f"expected a list of {n} layer types")
    # configuration_utils.remap_legacy_layer_types: "attention" is "full_attention"
    out = tuple(FULL if t == "attention" else t for t in layer_types)
    bad = sorted({str(t) for t in out if t not in LAYER_TYPES})
    if bad or len(out) != n:
        get.refuse("layer_types", layer_types,
                   f"expected {n} entries among {', '.join(LAYER_TYPES)}")
    return out


def _ropes_from_hf(get: Reader, head_dim: int, max_pos: int) -> dict[str, RopeSpec]:
    """One :class:`RopeSpec` per layer type, as ``Gemma3TextConfig.convert_rope_params_to_dict``
    and ``standardize_rope_params`` (nested case) build ``rope_parameters``."""
    cfg, source = get.cfg, get.source
    raw = cfg.get("rope_parameters")
    if raw is None:
        params: dict = {}
    elif isinstance(raw, dict):
        params = copy.deepcopy(raw)
    else:
        get.refuse("rope_parameters", raw, "expected a dictionary per layer type")
    flat = sorted(k for k in params if k not in LAYER_TYPES)
    if flat:  # kept beside the nested ones by transformers, and never read
        get.refuse("rope_parameters", raw,
                   f"keys {flat} are not layer types: transformers' Gemma 3 reads one "
                   f"dictionary per layer type ({', '.join(LAYER_TYPES)}) and ignores these; "
                   "nest them")
    for lt in LAYER_TYPES:
        if params.get(lt) is None:
            params[lt] = {"rope_type": "default"}
        elif not isinstance(params[lt], dict):
            get.refuse(f"rope_parameters.{lt}", params[lt], "expected a dictionary")
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            get.refuse("rope_scaling", scaling, "expected a dictionary")
        params[FULL] = {**params[FULL], **scaling}  # convert_rope_params_to_dict: full layers only
    params[FULL].setdefault("rope_theta", cfg.get("rope_theta", DEFAULT_THETA[FULL]))
    params[SLIDING].setdefault("rope_theta", cfg.get("rope_local_base_freq", DEFAULT_THETA[SLIDING]))
    out = {}
    for lt in LAYER_TYPES:
        p = params[lt]
        field = "rope_scaling" if lt == FULL and scaling is not None else f"rope_parameters.{lt}"
        if "type" in p and p.get("rope_type", p["type"]) != p["type"]:
            # rope_scaling {"type": "linear"} merged into {"rope_type": "default"}: transformers
            # keeps rope_type and computes the default rope
            get.refuse(f"{field}.type", p["type"],
                       f"transformers reads rope_type={p['rope_type']!r} and ignores the legacy "
                       "'type' key here; write rope_type")
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            get.refuse(f"{field}.rope_type", rope_type,
                       f"supported for Gemma 3: {', '.join(ROPE_TYPES)}")
        try:
            spec = rope_from_hf({"rope_parameters": p,
                                  "partial_rotary_factor": cfg.get("partial_rotary_factor")},
                                 head_dim, max_pos, source)
        except ValueError as e:  # name the nested field, not the top-level key
            raise ValueError(str(e).replace(f"{source}: rope_parameters", f"{source}: {field}", 1)) from None
        out[lt] = RopeSpec(**spec)
    return out


def to_hf_config(cfg: Gemma3TextConfig) -> dict:
    """The Hugging Face ``config.json`` dictionary of ``cfg`` (inverse of ``from_hf``)."""
    scalar = cfg.query_pre_attn_scalar
    if float(scalar).is_integer():
        scalar = int(scalar)  # Gemma3TextConfig types it int (strict dataclass)
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "hidden_activation": cfg.hidden_activation, "rms_norm_eps": cfg.rms_norm_eps,
        "query_pre_attn_scalar": scalar, "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types),
        "rope_parameters": {FULL: cfg.full_rope.to_hf(), SLIDING: cfg.sliding_rope.to_hf()},
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias,
        "final_logit_softcapping": cfg.final_logit_softcapping, "attn_logit_softcapping": None,
        "use_bidirectional_attention": False, "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": "float32",
    }


# ---- rotary embeddings ------------------------------------------------------------------------------


def rope_frequencies(cfg: Gemma3TextConfig, layer_type: str, seq_len: int) -> tuple[jax.Array, float]:
    """``(inv_freq [head_dim // 2] float32, attention_factor)`` of ``layer_type``'s rope."""
    view = types.SimpleNamespace(**dataclasses.asdict(cfg.rope(layer_type)), head_dim=cfg.head_dim,
                                 max_position_embeddings=cfg.max_position_embeddings,
                                 rope_partial_rotary_factor=1.0, rope_short_factor=None,
                                 rope_long_factor=None)
    return _llama_rope_frequencies(view, seq_len)


# ---- modules ----------------------------------------------------------------------------------------


class Gemma3RMSNorm(nnx.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + w)``, all in float32, cast back to the input dtype
    (transformers' ``Gemma3RMSNorm``; Llama's casts before multiplying by ``w``)."""

    def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        out = x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + self.weight[...].astype(jnp.float32))
        return out.astype(x.dtype)


class Gemma3Attention(nnx.Module):
    def __init__(self, cfg: Gemma3TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, nh, nkv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(use_bias=cfg.attention_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Linear(h, nh * dh, **kw)
        self.k_proj = Linear(h, nkv * dh, **kw)
        self.v_proj = Linear(h, nkv * dh, **kw)
        self.o_proj = Linear(nh * dh, h, **kw)
        self.q_norm = Gemma3RMSNorm(dh, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
        self.k_norm = Gemma3RMSNorm(dh, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)

    def __call__(self, x, cos, sin, mask_BxLxL, dropout_rng=None):
        cfg = self.cfg
        b, l, _ = x.shape
        nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rq, rk, rv, ro = split_rng(dropout_rng, 4)
        q = self.q_norm(self.q_proj(x, rq).reshape(b, l, nh, dh))
        k = self.k_norm(self.k_proj(x, rk).reshape(b, l, nkv, dh))
        v = self.v_proj(x, rv).reshape(b, l, nkv, dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = dot_product_attention(q, k, v, mask_BxLxL,
                                    scale=float(cfg.query_pre_attn_scalar) ** -0.5, dtype=cfg.dtype)
        return self.o_proj(out, ro)


class Gemma3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Gemma3TextConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(Gemma3RMSNorm, cfg.hidden_size, cfg.rms_norm_eps,
                                 param_dtype=cfg.param_dtype)
        self.self_attn = Gemma3Attention(cfg, rngs=rngs)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_activation,
                            dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def __call__(self, x, cos, sin, mask, dropout_rng=None):
        ra, rm = split_rng(dropout_rng, 2)
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, mask, ra))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), rm))


class Gemma3TextModel(nnx.Module):
    def __init__(self, cfg: Gemma3TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens, self.layers = decoder_stack(cfg, Gemma3DecoderLayer, rngs=rngs)
        self.norm = Gemma3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, attention_mask=None, dropout_rng=None):
        cfg = self.cfg
        b, l = input_ids.shape
        masks = {FULL: causal_mask(attention_mask, b, l)}
        if SLIDING in cfg.layer_types:
            # masking_utils.sliding_window_overlay: kv > q - window, on top of the causal mask
            masks[SLIDING] = causal_mask(attention_mask, b, l, cfg.sliding_window)
        rope = {lt: rope_cos_sin(*rope_frequencies(cfg, lt, l), l, cfg.dtype)
                for lt in sorted(set(cfg.layer_types))}
        # Gemma3TextScaledWordEmbedding: the scale is rounded to the weights' (= compute) dtype
        x = self.embed_tokens(input_ids) * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.dtype)
        for i, (layer, r) in enumerate(zip(self.layers, split_rng(dropout_rng, len(self.layers)))):
            lt = cfg.layer_types[i]
            x = layer(x, *rope[lt], masks[lt], r)
        return self.norm(x)


class Gemma3ForCausalLM(CausalLM, nnx.Module):
    """Causal LM head over :class:`Gemma3TextModel`; returns float32 logits ``[B, L, V]``."""

    # the family's checkpoint and LoRA names (jaxgrad.models.hub, jaxgrad.models.lora)
    BASE_PREFIX = "model"  # transformers' base_model_prefix
    EMBED_KEYS = ("model.embed_tokens.weight",)
    OUTPUT_HEAD = "lm_head"
    IGNORED_KEYS = ()  # rotary and embed_scale buffers are not persistent: never in a checkpoint
    LORA_TARGETS = ("q_proj", "k_proj", "v_proj")  # the paper's q, k, v
    PEFT_TARGETS = ("q_proj", "v_proj")  # peft's mapping for gemma3_text

    def __init__(self, cfg: Gemma3TextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = Gemma3TextModel(cfg, rngs=rngs)
        self._init_head(cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings,
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def output_logits(self, h: jax.Array) -> jax.Array:
        """The head's logits, then ``final_logit_softcapping`` when configured (in the compute
        dtype, as transformers)."""
        logits = super().output_logits(h)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
