"""Flax NNX GPT-NeoX (``model_type: gpt_neox``): EleutherAI's Pythia suite, GPT-NeoX-20B and
their fine-tunes.

Attribute names follow the checkpoint keys of Hugging Face's ``GPTNeoXForCausalLM``
(``gpt_neox.layers.3.attention.query_key_value.weight``, output head ``embed_out.weight``; in
memory transformers 5 calls the head ``lm_head`` and renames the key on load and save,
``conversion_mapping.py``). A checkpoint saved from the bare ``GPTNeoXModel`` (``layers.3...``,
``embed_in.weight``) loads through the ``gpt_neox`` prefix rule of :mod:`jaxgrad.models.hub`. The
forward pass is that of transformers 5 (``models/gpt_neox/modeling_gpt_neox.py``):

- token embeddings ``embed_in``, no position table; rotary embeddings on the first
  ``int(head_dim * partial_rotary_factor)`` dimensions of every query and key head (half-split
  ``rotate_half`` layout), the rest pass unrotated. ``partial_rotary_factor`` and the base come
  from ``rope_parameters`` (transformers 5), else from the legacy ``rotary_pct`` (default 0.25)
  and ``rotary_emb_base`` (default 10000); ``rope_scaling``, when set, replaces
  ``rope_parameters`` (``GPTNeoXConfig.convert_rope_params_to_dict``). Every rope type of
  :func:`jaxgrad.models.rope.rope_frequencies` is computed on that rotary dimension, as
  ``modeling_rope_utils`` does;
- the fused ``query_key_value`` ``[3 * hidden, hidden]``, whose output is laid out per head as
  ``[q | k | v]`` (``view(B, L, heads, 3 * head_size)`` then ``chunk(3)``); scores scaled by
  ``head_size ** -0.5``, softmax in float32; ``attention_bias`` puts biases on
  ``query_key_value`` *and* ``dense``;
- LayerNorms with bias (``layer_norm_eps``); the MLP ``dense_h_to_4h`` → ``ACT2FN[hidden_act]``
  → ``dense_4h_to_h``, both with biases;
- ``use_parallel_residual`` true: ``x + attn(ln1(x)) + mlp(ln2(x))``; false:
  ``y = x + attn(ln1(x)); y + mlp(ln2(y))``;
- ``final_layer_norm``, then the bias-free ``embed_out`` head, or the input embeddings when
  ``tie_word_embeddings`` (the loader unties when the checkpoint's ``embed_out.weight`` differs).

Every key of a config.json falls under one rule of :data:`HF_FIELDS` (computed, inert, not
applied, refused); ``docs/models/gpt_neox.md`` lists them with the reasons. A value jaxgrad does
not compute exactly is refused with a ``ValueError`` naming the file, the key and the value.

Call: ``model(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]`` (float32). The
attention mask is causal combined with key padding; positions are ``0..L-1`` as in Hugging Face
for right-padded batches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrad._compat import moved_names
from jaxgrad.models import llama as _llama
from jaxgrad.models.layers import (CausalLM, DecoderSizes, LayerNorm, Linear, causal_mask,
                                   decoder_stack, dot_product_attention, split_rng)
from jaxgrad.models.hf_config import (ACTIVATIONS, GENERIC_EXTRAS, GENERIC_FIELDS, Reader,
                                      check_option, field_table,
                                      resolve_config_dtypes)
from jaxgrad.models.rope import ROPE_TYPES, apply_rope, rope_cos_sin, rope_frequencies, rope_from_hf

__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)

DOC = "docs/models/gpt_neox.md"  # refusals point to this family's table of config.json keys

MODEL_TYPE = "gpt_neox"
DEFAULT_THETA = 10000.0  # RotaryEmbeddingConfigMixin.default_theta
DEFAULT_ROTARY_PCT = 0.25  # GPTNeoXConfig.convert_rope_params_to_dict

# config.json key -> (transformers' default, rule). The first block is GPTNeoXConfig's own
# dataclass fields with their defaults (tests/models/test_gpt_neox.py checks them against the installed
# transformers); the rest are the keys GPTNeoXConfig.convert_rope_params_to_dict, the modeling
# code, masking_utils.py and modeling_rope_utils.py read besides.
HF_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {MODEL_TYPE: field_table(
    GENERIC_FIELDS, GENERIC_EXTRAS,
    computed=dict(
        vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
        intermediate_size=24576, hidden_act="gelu",
        max_position_embeddings=2048,  # rope: dynamic threshold, yarn/longrope defaults
        layer_norm_eps=1e-5, tie_word_embeddings=False, use_parallel_residual=True,
        rope_parameters=None, attention_bias=True,
        # read (and popped) by GPTNeoXConfig.convert_rope_params_to_dict
        rotary_pct=DEFAULT_ROTARY_PCT, rotary_emb_base=DEFAULT_THETA, rope_scaling=None,
        original_max_position_embeddings=None,  # read by modeling_rope_utils
        head_dim=None),  # rope only: GPTNeoXAttention uses hidden_size // heads
    not_applied=dict(attention_dropout=0.0,
                     hidden_dropout=0.0),  # embedding, post-attention and post-MLP dropout
    inert=dict(
        classifier_dropout=0.1,  # GPTNeoXForTokenClassification only
        initializer_range=0.02, use_cache=True, bos_token_id=0, eos_token_id=2,
        pad_token_id=None, is_decoder=False,
        # read by modeling_rope_utils; GPTNeoXConfig fills the rope dictionary's rope_theta and
        # partial_rotary_factor before standardize_rope_params looks at these, so they are ignored
        rope_theta=None, partial_rotary_factor=None,
        # read by masking_utils for sliding masks; GPTNeoXModel builds a plain causal mask
        sliding_window=None, layer_types=None))}

_ROPE_FIELDS = ("rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_original_max_position", "rope_attention_factor",
                "rope_beta_fast", "rope_beta_slow", "rope_mscale", "rope_mscale_all_dim",
                "rope_truncate", "rope_short_factor", "rope_long_factor")


# ---- the typed config ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(DecoderSizes):
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    use_parallel_residual: bool = True
    attention_bias: bool = True  # on query_key_value and dense
    tie_word_embeddings: bool = False
    partial_rotary_factor: float = DEFAULT_ROTARY_PCT
    # the head size transformers' rope reads (config.json's head_dim); None: hidden // heads
    rope_head_dim: int | None = None
    max_position_embeddings: int = 2048  # dynamic rope's threshold
    # rope type and parameters, as jaxgrad.models.llama.LlamaConfig's fields of the same names
    rope_theta: float = DEFAULT_THETA
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rope_attention_factor: float | None = None
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_truncate: bool = True
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    model_type: str = MODEL_TYPE
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        resolve_config_dtypes(self)
        set_ = functools.partial(object.__setattr__, self)
        for name in ("rope_short_factor", "rope_long_factor"):
            if getattr(self, name) is not None:
                set_(name, tuple(getattr(self, name)))
        check_option("GPTNeoXConfig", "hidden_act", self.hidden_act, ACTIVATIONS)
        check_option("GPTNeoXConfig", "rope_type", self.rope_type, ROPE_TYPES)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"GPTNeoXConfig: num_attention_heads={self.num_attention_heads} does "
                             f"not divide hidden_size={self.hidden_size}")
        problem = self.rotary_problem()
        if problem:
            raise ValueError(f"GPTNeoXConfig: partial_rotary_factor={self.partial_rotary_factor!r}"
                             f" (rope_head_dim={self.rope_head_dim}): {problem}")

    @property
    def head_size(self) -> int:
        """The attention head size, ``hidden_size // num_attention_heads`` (``GPTNeoXAttention``)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """transformers' ``dim``: ``int(head_dim * partial_rotary_factor)``."""
        return int((self.rope_head_dim or self.head_size) * self.partial_rotary_factor)

    @property
    def rotary_width(self) -> int:
        """How many leading dimensions of each head rotate (the width of cos / sin)."""
        if self.rope_type == "proportional":  # all of head_dim, the tail with frequency 0
            return 2 * ((self.rope_head_dim or self.head_size) // 2)
        return self.rotary_dim

    def rotary_problem(self) -> str | None:
        """Why the rotary dimension is not computed (transformers fails or differs), or None."""
        return _rotary_problem(self.head_size, self.rope_head_dim, self.partial_rotary_factor,
                               self.rope_type)

    def rope_view(self) -> _llama.LlamaConfig:
        """A LlamaConfig whose :func:`~jaxgrad.models.rope.rope_frequencies` are this model's:
        head_dim = the rotary dimension (``proportional``: the rope's head_dim and factor)."""
        proportional = self.rope_type == "proportional"
        return _llama.LlamaConfig(
            vocab_size=1, hidden_size=1, intermediate_size=1, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1,
            head_dim=(self.rope_head_dim or self.head_size) if proportional else self.rotary_dim,
            rope_partial_rotary_factor=float(self.partial_rotary_factor) if proportional else 1.0,
            max_position_embeddings=self.max_position_embeddings,
            **{name: getattr(self, name) for name in _ROPE_FIELDS})

    @classmethod
    def from_hf(cls, cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32,
                source: str = "config.json") -> GPTNeoXConfig:
        """Build from a Hugging Face ``config.json`` dictionary (transformers 5 semantics).

        Missing keys take ``GPTNeoXConfig``'s defaults; keys that change the computation in a way
        jaxgrad does not reproduce raise ValueError naming ``source``, the key and its value.
        """
        model_type = cfg.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{source}: model_type={model_type!r} is not {MODEL_TYPE!r}")
        get = Reader(cfg, HF_FIELDS[MODEL_TYPE], source, doc=DOC)
        get.check_refused()
        dims = {key: get.positive_int(key) for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings")}
        hidden, heads = dims["hidden_size"], dims["num_attention_heads"]
        if hidden % heads:
            get.refuse("num_attention_heads", heads,
                       f"it does not divide hidden_size={hidden} (transformers refuses this too)")
        act = get.option("hidden_act", ACTIVATIONS)
        eps = get.number("layer_norm_eps")
        max_pos = dims.pop("max_position_embeddings")
        rope, partial, partial_field, rope_head = _neox_rope_from_hf(get, hidden // heads, max_pos)
        kwargs = dict(
            **dims, layer_norm_eps=float(eps), hidden_act=act,
            use_parallel_residual=bool(get("use_parallel_residual")),
            attention_bias=bool(get("attention_bias")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            partial_rotary_factor=partial, rope_head_dim=rope_head,
            max_position_embeddings=int(max_pos), dtype=dtype, param_dtype=param_dtype, **rope)
        problem = _rotary_problem(hidden // heads, rope_head, partial, rope["rope_type"])
        if problem:
            if rope_head is not None:
                problem += f" (head_dim={rope_head} in {source})"
            get.refuse(partial_field, partial, problem)
        return cls(**kwargs)


def _rotary_problem(head_size: int, rope_head_dim: int | None, partial: Any,
                    rope_type: str) -> str | None:
    """Why a rotary dimension is not computed (transformers fails or differs), or None."""
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or partial < 0:
        return "expected a non-negative number"
    rope_head = rope_head_dim or head_size
    dim = int(rope_head * partial)
    if rope_type != "proportional" and dim % 2:
        return (f"the rotary dimension int(head_dim * partial_rotary_factor) = {dim} is odd; "
                "not implemented")
    width = 2 * (rope_head // 2) if rope_type == "proportional" else dim
    if width > head_size:
        return (f"{width} rotary dimensions exceed the attention head size {head_size} "
                "(transformers fails on the shapes)")
    if rope_type == "dynamic" and dim == 2:
        return "dynamic rope with a rotary dimension of 2 divides by zero in transformers"
    return None


def _neox_rope_from_hf(get: Reader, head_size: int, max_pos: int):
    """``(rope fields, partial_rotary_factor, the key it came from, rope head_dim)`` as
    ``GPTNeoXConfig.convert_rope_params_to_dict`` and ``standardize_rope_params`` build
    ``config.rope_parameters``, and the rope functions then read it."""
    cfg = get.cfg
    scaling = cfg.get("rope_scaling")
    field = "rope_scaling" if scaling else "rope_parameters"
    raw = scaling or cfg.get("rope_parameters") or {}  # rope_scaling, when set, wins entirely
    if not isinstance(raw, dict):
        get.refuse(field, raw, "expected a dictionary")
    p = dict(raw)
    # setdefault: the dictionary's own values win over the legacy keys; a top-level rope_theta or
    # partial_rotary_factor comes too late to matter (standardize_rope_params uses setdefault too)
    p.setdefault("rope_theta", cfg.get("rotary_emb_base", DEFAULT_THETA))
    partial_field = "rotary_pct" if "partial_rotary_factor" not in p and "rotary_pct" in cfg \
        else f"{field}.partial_rotary_factor"  # absent from both: GPTNeoXConfig's default 0.25
    partial = p.setdefault("partial_rotary_factor", cfg.get("rotary_pct", DEFAULT_ROTARY_PCT))
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or partial < 0:
        get.refuse(partial_field, partial, "expected a non-negative number")
    rope_type = p["rope_type"] if "rope_type" in p else p.get("type", "default")
    # modeling_rope_utils reads getattr(config, "head_dim") (a config.json key, not a field)
    head_dim = cfg.get("head_dim", None)
    if head_dim is None and "head_dim" in cfg and rope_type in ("dynamic", "yarn", "longrope"):
        get.refuse("head_dim", None, f"rope type {rope_type!r} reads it without a fallback "
                   "and fails in transformers")
    head_dim = get.positive_int("head_dim", or_none=True)
    rope_head = head_dim or head_size
    if rope_type != "proportional":  # the rope functions compute on dim = int(head_dim * partial)
        p.pop("partial_rotary_factor")
        dim = int(rope_head * partial)
    else:
        dim = rope_head
    legacy = {field: p}
    if "original_max_position_embeddings" in cfg:
        legacy["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    rope = rope_from_hf(legacy, dim, max_pos, get.source)
    rope.pop("rope_partial_rotary_factor", None)
    return rope, partial, partial_field, head_dim


def to_hf_config(cfg: GPTNeoXConfig) -> dict:
    """The Hugging Face ``config.json`` dictionary of ``cfg`` (inverse of ``from_hf``)."""
    rope = _llama.to_hf_config(cfg.rope_view())["rope_parameters"]
    rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    out = {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_parallel_residual": cfg.use_parallel_residual, "attention_bias": cfg.attention_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings, "rope_parameters": rope,
        "dtype": "float32",
    }
    if cfg.rope_head_dim is not None:
        out["head_dim"] = cfg.rope_head_dim
    return out


# ---- modules ----------------------------------------------------------------------------------------


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``apply_rotary_pos_emb``: rotate the first ``cos.shape[-1]`` dimensions of each head."""
    width = cos.shape[-1]
    if width == 0:
        return x
    return jnp.concatenate([apply_rope(x[..., :width], cos, sin), x[..., width:]], axis=-1)


class GPTNeoXAttention(nnx.Module):
    def __init__(self, cfg: GPTNeoXConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden_size
        kw = dict(use_bias=cfg.attention_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  rngs=rngs)
        self.query_key_value = Linear(h, 3 * h, **kw)
        self.dense = Linear(h, h, **kw)

    def __call__(self, x, cos, sin, mask_BxLxL, dropout_rng=None):
        cfg = self.cfg
        b, l, _ = x.shape
        nh, hs = cfg.num_attention_heads, cfg.head_size
        r_qkv, r_dense = split_rng(dropout_rng, 2)
        qkv = self.query_key_value(x, r_qkv).reshape(b, l, nh, 3, hs)  # per head [q | k | v]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = dot_product_attention(q, k, v, mask_BxLxL, divisor=math.sqrt(hs), dtype=cfg.dtype)
        return self.dense(out, r_dense)


class GPTNeoXMLP(nnx.Module):
    def __init__(self, cfg: GPTNeoXConfig, *, rngs: nnx.Rngs):
        self.hidden_act = cfg.hidden_act
        kw = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.dense_h_to_4h = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.dense_4h_to_h = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x, dropout_rng=None):
        r_in, r_out = split_rng(dropout_rng, 2)
        return self.dense_4h_to_h(ACTIVATIONS[self.hidden_act](self.dense_h_to_4h(x, r_in)), r_out)


class GPTNeoXLayer(nnx.Module):
    def __init__(self, cfg: GPTNeoXConfig, *, rngs: nnx.Rngs):
        self.use_parallel_residual = cfg.use_parallel_residual
        norm_kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm_kw)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **norm_kw)
        self.attention = GPTNeoXAttention(cfg, rngs=rngs)
        self.mlp = GPTNeoXMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, dropout_rng=None):
        ra, rm = split_rng(dropout_rng, 2)
        attn = self.attention(self.input_layernorm(x), cos, sin, mask, ra)
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(x), rm) + attn + x
        y = attn + x
        return self.mlp(self.post_attention_layernorm(y), rm) + y


class GPTNeoXModel(nnx.Module):
    def __init__(self, cfg: GPTNeoXConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_in, self.layers = decoder_stack(cfg, GPTNeoXLayer, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=cfg.dtype,
                                          param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, attention_mask=None, dropout_rng=None):
        cfg = self.cfg
        b, l = input_ids.shape
        mask = causal_mask(attention_mask, b, l)
        cos, sin = rope_cos_sin(*rope_frequencies(cfg.rope_view(), l), l, cfg.dtype)
        x = self.embed_in(input_ids)
        for layer, r in zip(self.layers, split_rng(dropout_rng, len(self.layers)), strict=True):
            x = layer(x, cos, sin, mask, r)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(CausalLM, nnx.Module):
    """Causal LM head over :class:`GPTNeoXModel`; returns float32 logits ``[B, L, V]``."""

    # the family's checkpoint and LoRA names (jaxgrad.models.hub, jaxgrad.models.lora)
    BASE_PREFIX = "gpt_neox"  # transformers' base_model_prefix
    EMBED_KEYS = ("gpt_neox.embed_in.weight",)
    OUTPUT_HEAD = "embed_out"  # the checkpoint's name (transformers 5 renames it lm_head in memory)
    PEFT_OUTPUT_HEAD = "lm_head"  # peft's name for it: head adapters cannot be exchanged
    # GPTNeoXPreTrainedModel._keys_to_ignore_on_load_unexpected (old Pythia buffers) and the
    # rotary cache older transformers saved
    IGNORED_KEYS = (r"(.*\.)?attention\.bias", r"(.*\.)?attention\.masked_bias",
                    r"(.*\.)?attention\.rotary_emb\.inv_freq")
    LORA_TARGETS = ("query_key_value",)  # the paper's q, k, v: one fused layer here
    PEFT_TARGETS = ("query_key_value",)  # peft TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, cfg: GPTNeoXConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.gpt_neox = GPTNeoXModel(cfg, rngs=rngs)
        self._init_head(cfg.hidden_size, cfg.vocab_size, cfg.tie_word_embeddings,
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
