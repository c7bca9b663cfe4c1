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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrad.models.layers import (CausalLM, Embed, Linear, RMSNorm, dot_product_attention,
                                   split_rng)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
SUPPORTED_ROPE_TYPES = ROPE_TYPES  # older name
LAYER_TYPES = ("full_attention", "sliding_attention")

# ---- the one dtype rule ---------------------------------------------------------------------------

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: Any, what: str = "dtype"):
    """``jnp.float32`` or ``jnp.bfloat16`` for ``dtype`` given as a name (``"float32"``,
    ``"bfloat16"``) or as a numpy / JAX dtype or scalar type.

    Every other dtype is refused with a ValueError naming ``what`` and the value: float16 (T5's
    activations overflow its range: transformers clamps them and keeps ``wo`` in float32, which
    jaxgrad does not reproduce), float64, integer types, torch dtypes, unknown names.
    """
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
    if name in DTYPES:
        return DTYPES[name]
    why = ("jaxgrad supports float16 for no model (its range, max 65504, overflows in T5's "
           "feed-forward activations, which transformers works around with clamps and float32 "
           "`wo` weights that jaxgrad does not reproduce); use 'bfloat16' for half precision"
           if name == "float16" else "jaxgrad computes and stores in float32 or bfloat16 only")
    raise ValueError(f"{what}={dtype!r} is not supported: {why}; expected one of "
                     f"{sorted(DTYPES)} (a name, or the numpy/JAX dtype)")


# ---- activations (transformers.activations.ACT2FN names) -------------------------------------------

ACTIVATIONS = {
    "silu": jax.nn.silu,  # SiLUActivation: x * sigmoid(x)
    "swish": jax.nn.silu,  # nn.SiLU
    "relu": jax.nn.relu,  # nn.ReLU
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # GELUActivation: erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # NewGELUActivation: tanh form
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GELUTanh
}

# ---- config.json keys -------------------------------------------------------------------------------

COMPUTED = "computed"  # read, and its effect on the logits reproduced (some values refused)
INERT = "inert"  # no effect on transformers' forward pass either (metadata, init, generation)
NOT_APPLIED = "not applied"  # training-time base-model dropout: jaxgrad applies none
REFUSED = "refused"  # any value but the default is refused
RULES = (COMPUTED, INERT, NOT_APPLIED, REFUSED)

# PreTrainedConfig's own dataclass fields (configuration_utils.py), shared by every model type.
GENERIC_FIELDS = {
    "transformers_version": (None, INERT),
    "architectures": (None, INERT),
    "output_hidden_states": (False, INERT),
    "return_dict": (True, INERT),
    "dtype": (None, INERT),
    "chunk_size_feed_forward": (0, INERT),
    "is_encoder_decoder": (False, INERT),
    "id2label": (None, INERT),
    "label2id": (None, INERT),
    "problem_type": (None, INERT),
}
# Keys no config class declares but that transformers reads for every model type here.
GENERIC_EXTRAS = {
    "model_type": (None, COMPUTED),  # picks the architecture
    "torch_dtype": (None, INERT),  # transformers-4 name of `dtype`
    "is_causal": (True, REFUSED),  # masking_utils: False makes the causal mask bidirectional
    "quantization_config": (None, REFUSED),  # from_pretrained dequantizes / replaces layers
}
_ROPE_EXTRAS = {  # read by PreTrainedConfig.convert_rope_params_to_dict / standardize_rope_params
    "rope_theta": (10000.0, COMPUTED),
    "rope_scaling": (None, COMPUTED),
    "partial_rotary_factor": (None, COMPUTED),
    "original_max_position_embeddings": (None, COMPUTED),
}

# Keys every Llama-family config class declares, with one rule each, and the default where the
# three classes agree (_PER_TYPE: each gives its own, see HF_FIELDS).
_PER_TYPE = object()
_DECODER_SHARED = {
    "vocab_size": (_PER_TYPE, COMPUTED),
    "hidden_size": (4096, COMPUTED),
    "intermediate_size": (_PER_TYPE, COMPUTED),
    "num_hidden_layers": (32, COMPUTED),
    "num_attention_heads": (32, COMPUTED),
    "num_key_value_heads": (_PER_TYPE, COMPUTED),
    "head_dim": (None, COMPUTED),  # not a Qwen2Config field; Qwen2Attention reads it
    "hidden_act": ("silu", COMPUTED),
    "max_position_embeddings": (_PER_TYPE, COMPUTED),
    "initializer_range": (0.02, INERT),
    "rms_norm_eps": (1e-6, COMPUTED),
    "use_cache": (True, INERT),
    "pad_token_id": (None, INERT),
    "bos_token_id": (_PER_TYPE, INERT),
    "eos_token_id": (_PER_TYPE, INERT),
    "tie_word_embeddings": (False, COMPUTED),
    "rope_parameters": (None, COMPUTED),
    "attention_dropout": (0.0, NOT_APPLIED),
}


def _decoder_fields(own: dict[str, tuple[Any, str]], **defaults) -> dict[str, tuple[Any, str]]:
    """One model type's table: the generic keys, the shared decoder keys with this type's
    ``defaults`` (every ``_PER_TYPE`` one must be given), its ``own`` keys, and the extras."""
    shared = {}
    for key, (default, rule) in _DECODER_SHARED.items():
        default = defaults.pop(key, default)
        if default is _PER_TYPE:
            raise TypeError(f"_decoder_fields: no default given for {key!r}")
        shared[key] = (default, rule)
    if defaults:
        raise TypeError(f"_decoder_fields: {sorted(defaults)} are not shared decoder keys")
    return {**GENERIC_FIELDS, **shared, **own, **GENERIC_EXTRAS, **_ROPE_EXTRAS}


# model_type -> {config.json key: (transformers' default, rule)}. The class fields and defaults
# are those of the installed transformers' LlamaConfig / MistralConfig / Qwen2Config (checked by
# tests/test_model_configs.py); the extras are the further keys their modeling code reads.
HF_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "llama": _decoder_fields(
        {"pretraining_tp": (1, INERT),
         "attention_bias": (False, COMPUTED),
         "mlp_bias": (False, COMPUTED),
         # not LlamaConfig fields; LlamaModel always builds a plain causal mask
         "sliding_window": (None, INERT),
         "layer_types": (None, INERT)},
        vocab_size=32000, intermediate_size=11008, num_key_value_heads=None,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": _decoder_fields(
        {"sliding_window": (4096, COMPUTED),
         "layer_types": (None, INERT)},  # not a MistralConfig field: warned about, never read
        vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
        max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2),
    "qwen2": _decoder_fields(
        {"use_sliding_window": (False, COMPUTED),
         "sliding_window": (4096, COMPUTED),
         "max_window_layers": (28, COMPUTED),
         "layer_types": (None, COMPUTED)},
        vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
        max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
}


def refuse(source: str, field: str, value: Any, why: str, *,
           doc: str = "docs/config_fields.md") -> None:
    """Raise the ValueError every unsupported config value gets: file, field, value, reason, and
    ``doc``, the family's table of config keys."""
    raise ValueError(f"{source}: {field}={value!r} is not supported: {why} (see {doc})")


def check_refused_fields(cfg: dict, fields: dict[str, tuple[Any, str]], source: str, *,
                         doc: str = "docs/config_fields.md") -> None:
    """Refuse every key whose rule is ``refused`` and whose value is not the default."""
    for name, (default, rule) in fields.items():
        if rule == REFUSED and name in cfg and cfg[name] != default:
            why = {"is_causal": "a bidirectional decoder (is_causal=false) is not implemented",
                   "quantization_config": "quantized checkpoints are not supported; use a float "
                                          "checkpoint (or a GGUF, which jaxgrad dequantizes)"}
            refuse(source, name, cfg[name], why.get(name, "not implemented"), doc=doc)


class _Reader:
    """``config.json`` values with transformers' defaults for the model type."""

    def __init__(self, cfg: dict, fields: dict[str, tuple[Any, str]]):
        self.cfg, self.fields = cfg, fields

    def __call__(self, name: str) -> Any:
        return self.cfg[name] if name in self.cfg else self.fields[name][0]


# ---- the typed config ------------------------------------------------------------------------------


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
        set_ = functools.partial(object.__setattr__, self)
        set_("dtype", resolve_dtype(self.dtype, "dtype"))
        set_("param_dtype", resolve_dtype(self.param_dtype, "param_dtype"))
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"LlamaConfig: hidden_act={self.hidden_act!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"LlamaConfig: rope_type={self.rope_type!r} is not supported; "
                             f"supported: {', '.join(ROPE_TYPES)}")
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
        fields = HF_FIELDS[model_type]
        check_refused_fields(cfg, fields, source)
        get = _Reader(cfg, fields)
        heads = get("num_attention_heads")
        kv = get("num_key_value_heads") or heads
        if heads % kv:
            refuse(source, "num_key_value_heads", kv,
                   f"num_attention_heads={heads} is not a multiple of it")
        head_dim = get("head_dim") or get("hidden_size") // heads
        act = get("hidden_act")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            refuse(source, "hidden_act", act, f"supported: {', '.join(ACTIVATIONS)}")
        if model_type == "llama":  # LlamaAttention: bias=config.attention_bias on q, k, v and o
            qkv_bias = o_bias = bool(get("attention_bias"))
            mlp_bias = bool(get("mlp_bias"))
        else:  # Qwen2Attention: q/k/v bias=True, o bias=False; Mistral: no biases at all
            qkv_bias, o_bias, mlp_bias = model_type == "qwen2", False, False
        max_pos = get("max_position_embeddings")
        window, layer_types = _sliding_from_hf(cfg, model_type, get, source)
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps")),
            **_rope_from_hf(cfg, head_dim, max_pos, source),
            max_position_embeddings=int(max_pos),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            hidden_act=act,
            sliding_window=window,
            layer_types=layer_types,
            model_type=model_type,
            dtype=dtype,
            param_dtype=param_dtype,
        )


def _sliding_from_hf(cfg: dict, model_type: str, get, source: str):
    """``(sliding_window, layer_types)`` as MistralModel / Qwen2Model build their masks."""
    n = get("num_hidden_layers")
    if model_type == "llama":  # LlamaModel always builds a full causal mask
        return None, None
    if model_type == "mistral":  # every layer, when sliding_window is not None
        window = get("sliding_window")
        if window is not None:
            _check_window(window, source)
        return window, None
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
            refuse(source, "layer_types", cfg.get("layer_types"),
                   f"expected {n} entries among {', '.join(LAYER_TYPES)}")
        if "sliding_attention" in layer_types and window is None:
            refuse(source, "layer_types", cfg.get("layer_types"),
                   "sliding_attention layers without a window (use_sliding_window="
                   f"{get('use_sliding_window')!r}, sliding_window={get('sliding_window')!r}); "
                   "transformers refuses this too")
    if window is not None:
        _check_window(window, source)
    return window, tuple(layer_types)


def _check_window(window: Any, source: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        refuse(source, "sliding_window", window, "expected a positive integer or null")


_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                  "longrope": ("short_factor", "long_factor"),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def _rope_from_hf(cfg: dict, head_dim: int, max_pos: int, source: str) -> dict:
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
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_type in ("llama3", "yarn", "longrope"):
        rope["original_max_position_embeddings"] = cfg.rope_original_max_position
    if cfg.rope_type in ("yarn", "longrope") and cfg.rope_attention_factor is not None:
        rope["attention_factor"] = cfg.rope_attention_factor
    if cfg.rope_type == "yarn":
        rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                    truncate=cfg.rope_truncate)
        rope.update({k: v for k, v in (("mscale", cfg.rope_mscale),
                                       ("mscale_all_dim", cfg.rope_mscale_all_dim)) if v is not None})
    if cfg.rope_type == "longrope":
        rope.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor))
    if cfg.rope_type == "proportional":
        rope["partial_rotary_factor"] = cfg.rope_partial_rotary_factor
    out = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[mt]],
        "model_type": mt, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
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


# ---- rotary embeddings ------------------------------------------------------------------------------


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: LlamaConfig, seq_len: int) -> tuple[jax.Array, float]:
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


def rope_inv_freq(cfg: LlamaConfig, seq_len: int | None = None) -> jax.Array:
    """Inverse frequencies ``[head_dim // 2]`` after the configured scaling."""
    return rope_frequencies(cfg, cfg.max_position_embeddings if seq_len is None else seq_len)[0]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, L, H, Dh]`` by half-split RoPE (Hugging Face's ``rotate_half`` layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


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


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        kw = dict(use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x, dropout_rng=None):
        rg, ru, rd = split_rng(dropout_rng, 3)
        act = ACTIVATIONS[self.hidden_act]
        return self.down_proj(act(self.gate_proj(x, rg)) * self.up_proj(x, ru), rd)


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
        query, key = jnp.arange(l)[:, None], jnp.arange(l)[None, :]
        keys = attention_mask[:, None, :] > 0
        full = (key <= query)[None] & keys
        sliding = None
        if any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)):
            # masking_utils.sliding_window_causal_mask_function: kv > q - window, kv <= q
            sliding = ((key <= query) & (key > query - cfg.sliding_window))[None] & keys
        inv_freq, attention_factor = rope_frequencies(cfg, l)
        freqs = jnp.arange(l, dtype=jnp.float32)[:, None] * inv_freq[None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos = (jnp.cos(emb) * attention_factor)[None, :, None, :].astype(cfg.dtype)
        sin = (jnp.sin(emb) * attention_factor)[None, :, None, :].astype(cfg.dtype)
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
