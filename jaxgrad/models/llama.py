"""Flax NNX decoder for the Llama family: Llama 2/3, TinyLlama, SmolLM, Mistral, Qwen2.

Attribute names follow Hugging Face's ``LlamaForCausalLM`` so that module paths equal safetensors
keys (``model.layers.3.mlp.down_proj.weight``). One module covers the family; the differences are
config fields, read from ``config.json`` the way transformers 5 (``models/{llama,mistral,qwen2}/
configuration_*.py`` and ``modeling_*.py``) reads them:

- grouped-query attention (``num_key_value_heads``), explicit ``head_dim`` when the config has one;
- RoPE from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``
  (transformers 4), every rope type of transformers' ``modeling_rope_utils``: ``default``,
  ``linear``, ``dynamic``, ``yarn``, ``longrope``, ``llama3``, ``proportional``;
- biases: Llama's ``attention_bias`` puts one on q, k, v *and* o; Qwen2 always has q/k/v biases
  and no o bias; Mistral has none; ``mlp_bias`` (Llama only) on gate/up/down;
- sliding-window attention: Mistral's ``sliding_window`` on every layer, Qwen2's on the layers
  ``layer_types`` (or ``use_sliding_window`` + ``max_window_layers``) name; token i attends j iff
  ``0 <= i - j < sliding_window`` (``masking_utils.sliding_window_overlay``);
- tied or untied output embeddings (``tie_word_embeddings``; the loader unties when the
  checkpoint's ``lm_head.weight`` differs from the embeddings, as transformers does);
- ``hidden_act`` from :data:`ACTIVATIONS`.

Every key of a config.json falls under one rule of :data:`HF_FIELDS` (computed, inert, not
applied, refused); ``docs/config_fields.md`` lists them with the reasons. A value jaxgrad does not
compute exactly is refused with a ``ValueError`` naming the file, the field and the value.

Compute dtypes: float32 or bfloat16 (:func:`resolve_dtype`, the one dtype rule of
``jaxgrad.models``); float16 and everything else is refused by name.

Call: ``model(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]`` (float32). The
attention mask is causal (and windowed on sliding layers) combined with key padding; positions
are ``0..L-1`` as in Hugging Face for right-padded batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxgrad._compat import moved_names
from jaxgrad.models.hf_config import (ACTIVATIONS, GENERIC_EXTRAS, GENERIC_FIELDS, Reader,
                                      check_option, field_table, resolve_config_dtypes)
from jaxgrad.models.layers import (CausalLM, DecoderSizes, GatedMLP, Linear, RMSNorm, causal_mask,
                                   decoder_stack, dot_product_attention, split_rng)
from jaxgrad.models.rope import (ROPE_TYPES, apply_rope, rope_cos_sin, rope_frequencies,
                                 rope_from_hf, rope_to_hf)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ROPE_TYPES  # older name
LAYER_TYPES = ("full_attention", "sliding_attention")

# ---- config.json keys -------------------------------------------------------------------------------

# read by PreTrainedConfig.convert_rope_params_to_dict / standardize_rope_params
_ROPE_EXTRAS = field_table(computed=dict(rope_theta=10000.0, rope_scaling=None,
                                         partial_rotary_factor=None,
                                         original_max_position_embeddings=None))

# Keys every Llama-family config class declares, with the default where the three classes agree,
# and the extras every one reads; each model type adds its own defaults and keys (HF_FIELDS).
_DECODER_SHARED = field_table(
    GENERIC_FIELDS, GENERIC_EXTRAS, _ROPE_EXTRAS,
    computed=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  head_dim=None,  # not a Qwen2Config field; Qwen2Attention reads it
                  hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters=None),
    inert=dict(initializer_range=0.02, use_cache=True, pad_token_id=None),
    not_applied=dict(attention_dropout=0.0))


def _decoder_fields(*, vocab_size, intermediate_size, num_key_value_heads, max_position_embeddings,
                    bos_token_id, eos_token_id, computed=None, inert=None):
    """One model type's table: the shared keys, the ones whose default is the type's own (every
    one required), and its own ``computed`` / ``inert`` keys."""
    return field_table(_DECODER_SHARED, computed=dict(
        vocab_size=vocab_size, intermediate_size=intermediate_size,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        **(computed or {})), inert=dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                        **(inert or {})))


# model_type -> {config.json key: (transformers' default, rule)}. The class fields and defaults
# are those of the installed transformers' LlamaConfig / MistralConfig / Qwen2Config (checked by
# tests/models/test_hf_config.py); the extras are the further keys their modeling code reads.
HF_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "llama": _decoder_fields(
        vocab_size=32000, intermediate_size=11008, num_key_value_heads=None,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        computed=dict(attention_bias=False, mlp_bias=False),
        # sliding_window, layer_types: not LlamaConfig fields; LlamaModel builds a causal mask
        inert=dict(pretraining_tp=1, sliding_window=None, layer_types=None)),
    "mistral": _decoder_fields(
        vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
        max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2,
        computed=dict(sliding_window=4096),
        inert=dict(layer_types=None)),  # not a MistralConfig field: warned about, never read
    "qwen2": _decoder_fields(
        vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
        max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
        computed=dict(use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                      layer_types=None)),
}


# ---- the typed config ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderSizes):
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rope_attention_factor: float | None = None  # yarn / longrope; None = transformers' formula
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_mscale: float | None = None  # yarn
    rope_mscale_all_dim: float | None = None  # yarn
    rope_truncate: bool = True  # yarn
    rope_partial_rotary_factor: float = 1.0  # proportional
    rope_short_factor: tuple[float, ...] | None = None  # longrope
    rope_long_factor: tuple[float, ...] | None = None  # longrope
    max_position_embeddings: int = 2048  # dynamic rope's threshold
    attention_bias: bool = False  # q, k, v biases
    o_proj_bias: bool = False  # o_proj bias (Llama's attention_bias sets both)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    # per layer "full_attention" / "sliding_attention"; None: every layer slides when
    # sliding_window is set (Mistral)
    layer_types: tuple[str, ...] | None = None
    model_type: str = "llama"
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        resolve_config_dtypes(self)
        set_ = functools.partial(object.__setattr__, self)
        check_option("LlamaConfig", "hidden_act", self.hidden_act, ACTIVATIONS)
        check_option("LlamaConfig", "rope_type", self.rope_type, ROPE_TYPES)
        for name in ("rope_short_factor", "rope_long_factor", "layer_types"):
            value = getattr(self, name)
            if value is not None:
                set_(name, tuple(value))
        if self.layer_types is not None:
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"LlamaConfig: layer_types={self.layer_types!r} must list "
                                 f"{self.num_hidden_layers} of {LAYER_TYPES}")

    def is_sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    @classmethod
    def from_hf(cls, cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32,
                source: str = "config.json") -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dictionary (transformers 5 semantics).

        Missing keys take the defaults of transformers' config class for the model type; keys
        that change the computation in a way jaxgrad does not reproduce raise ValueError naming
        ``source``, the key and its value.
        """
        model_type = cfg.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not a Llama-family type; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        get = Reader(cfg, HF_FIELDS[model_type], source)
        get.check_refused()
        heads = get("num_attention_heads")
        kv = get("num_key_value_heads") or heads
        if heads % kv:
            get.refuse("num_key_value_heads", kv,
                       f"num_attention_heads={heads} is not a multiple of it")
        head_dim = get("head_dim") or get("hidden_size") // heads
        act = get.option("hidden_act", ACTIVATIONS)
        if model_type == "llama":  # LlamaAttention: bias=config.attention_bias on q, k, v and o
            qkv_bias = o_bias = bool(get("attention_bias"))
            mlp_bias = bool(get("mlp_bias"))
        else:  # Qwen2Attention: q/k/v bias=True, o bias=False; Mistral: no biases at all
            qkv_bias, o_bias, mlp_bias = model_type == "qwen2", False, False
        max_pos = get("max_position_embeddings")
        window, layer_types = _sliding_from_hf(cfg, model_type, get)
        return cls(
            **get.values("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps")), **rope_from_hf(cfg, head_dim, max_pos, source),
            max_position_embeddings=int(max_pos), attention_bias=qkv_bias, o_proj_bias=o_bias,
            mlp_bias=mlp_bias, tie_word_embeddings=bool(get("tie_word_embeddings")),
            hidden_act=act, sliding_window=window, layer_types=layer_types,
            model_type=model_type, dtype=dtype, param_dtype=param_dtype)


def _sliding_from_hf(cfg: dict, model_type: str, get: Reader):
    """``(sliding_window, layer_types)`` as MistralModel / Qwen2Model build their masks."""
    n = get("num_hidden_layers")
    if model_type == "llama":  # LlamaModel always builds a full causal mask
        return None, None
    if model_type == "mistral":  # every layer, when sliding_window is not None
        return get.positive_int("sliding_window", or_none=True), None
    # Qwen2Config.__post_init__: the window only with use_sliding_window; layer_types (default:
    # sliding from layer max_window_layers on) decides which layers use it.
    window = get("sliding_window") if get("use_sliding_window") else None
    layer_types = get("layer_types")
    if layer_types is None:
        mwl = get("max_window_layers")
        layer_types = ["sliding_attention" if window is not None and i >= mwl else "full_attention"
                       for i in range(n)]
    else:
        # configuration_utils.remap_legacy_layer_types: "attention" is "full_attention"
        layer_types = ["full_attention" if t == "attention" else t for t in layer_types]
        bad = sorted({t for t in layer_types if t not in LAYER_TYPES})
        if bad or len(layer_types) != n:
            get.refuse("layer_types", cfg.get("layer_types"),
                       f"expected {n} entries among {', '.join(LAYER_TYPES)}")
        if "sliding_attention" in layer_types and window is None:
            get.refuse("layer_types", cfg.get("layer_types"),
                       "sliding_attention layers without a window (use_sliding_window="
                       f"{get('use_sliding_window')!r}, sliding_window={get('sliding_window')!r}); "
                       "transformers refuses this too")
    if window is not None:
        window = get.positive_int("sliding_window", or_none=True)
    return window, tuple(layer_types)


def to_hf_config(cfg: LlamaConfig) -> dict:
    """The Hugging Face ``config.json`` dictionary of ``cfg`` (inverse of ``from_hf``).

    Raises ValueError for a combination transformers cannot express (e.g. q/k/v biases without
    the o_proj bias on a Llama).
    """
    mt = cfg.model_type
    biases = (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias)
    expressible = {"llama": cfg.attention_bias == cfg.o_proj_bias,
                   "qwen2": biases == (True, False, False),
                   "mistral": biases == (False, False, False)}[mt]
    if not expressible:
        raise ValueError(f"to_hf_config: a {mt} config cannot have attention_bias="
                         f"{cfg.attention_bias}, o_proj_bias={cfg.o_proj_bias}, "
                         f"mlp_bias={cfg.mlp_bias} in transformers")
    out = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[mt]],
        "model_type": mt, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope_to_hf(cfg),
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
        "dtype": "float32",
    }
    if mt == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if mt == "mistral":
        if cfg.sliding_window is not None and cfg.layer_types is not None \
                and "full_attention" in cfg.layer_types:
            raise ValueError("to_hf_config: Mistral slides on every layer or none")
        out["sliding_window"] = cfg.sliding_window
    if mt == "qwen2":
        layers = [("sliding_attention" if cfg.is_sliding(i) else "full_attention")
                  for i in range(cfg.num_hidden_layers)]
        out.update(use_sliding_window=cfg.sliding_window is not None,
                   sliding_window=cfg.sliding_window, layer_types=layers)
    if mt == "llama" and cfg.sliding_window is not None:
        raise ValueError("to_hf_config: transformers' Llama has no sliding window")
    return out


# ---- modules ----------------------------------------------------------------------------------------


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h, nh, nkv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Linear(h, nh * dh, use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(h, nkv * dh, use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(h, nkv * dh, use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(nh * dh, h, use_bias=cfg.o_proj_bias, **kw)

    def __call__(self, x, cos, sin, mask_BxLxL, dropout_rng=None):
        cfg = self.cfg
        b, l, _ = x.shape
        nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        rq, rk, rv, ro = split_rng(dropout_rng, 4)
        q = self.q_proj(x, rq).reshape(b, l, nh, dh)
        k = self.k_proj(x, rk).reshape(b, l, nkv, dh)
        v = self.v_proj(x, rv).reshape(b, l, nkv, dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = dot_product_attention(q, k, v, mask_BxLxL, divisor=math.sqrt(dh), dtype=cfg.dtype)
        return self.o_proj(out, ro)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        norm_kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                            use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            rngs=rngs)

    def __call__(self, x, cos, sin, mask, dropout_rng=None):
        ra, rm = split_rng(dropout_rng, 2)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, ra)
        return x + self.mlp(self.post_attention_layernorm(x), rm)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens, self.layers = decoder_stack(cfg, LlamaDecoderLayer, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, attention_mask=None, dropout_rng=None):
        cfg = self.cfg
        b, l = input_ids.shape
        full = causal_mask(attention_mask, b, l)
        sliding = None
        if any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)):
            # masking_utils.sliding_window_causal_mask_function: kv > q - window, kv <= q
            sliding = causal_mask(attention_mask, b, l, cfg.sliding_window)
        cos, sin = rope_cos_sin(*rope_frequencies(cfg, l), l, cfg.dtype)
        x = self.embed_tokens(input_ids)
        for i, (layer, r) in enumerate(zip(self.layers, split_rng(dropout_rng, len(self.layers)))):
            x = layer(x, cos, sin, sliding if cfg.is_sliding(i) else full, r)
        return self.norm(x)


class LlamaForCausalLM(CausalLM, nnx.Module):
    """Causal LM head over :class:`LlamaModel`; returns float32 logits ``[B, L, V]``."""

    # the family's checkpoint and LoRA names (jaxgrad.models.hub, jaxgrad.models.lora)
    BASE_PREFIX = "model"  # transformers' base_model_prefix
    EMBED_KEYS = ("model.embed_tokens.weight",)
    OUTPUT_HEAD = "lm_head"
    LORA_TARGETS = ("q_proj", "k_proj", "v_proj")  # the paper's q, k, v
    PEFT_TARGETS = ("q_proj", "v_proj")  # peft's mapping for llama, mistral, qwen2

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.model = LlamaModel(cfg, rngs=rngs)
        self._init_head(cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings,
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)
