"""Flax NNX GPT-2 (``model_type: gpt2``): OpenAI GPT-2, DistilGPT2 and their fine-tunes.

Attribute names follow Hugging Face's ``GPT2LMHeadModel`` so that module paths equal safetensors
keys (``transformer.h.3.attn.c_attn.weight``); a checkpoint saved from the bare ``GPT2Model``
(``h.3.attn.c_attn.weight``, ``wte.weight``: the Hub's own gpt2 files) loads through the
``transformer`` prefix rule of :mod:`jaxgrad.models.hub`. The forward pass is that of
transformers 5 (``models/gpt2/modeling_gpt2.py``):

- token embeddings ``wte`` plus learned positions ``wpe`` (positions ``0..L-1``, as transformers
  without ``position_ids`` for right-padded batches); a batch longer than ``n_positions`` is
  refused with a ValueError (the position table has ``n_positions`` rows);
- pre-LayerNorm blocks (``ln_1`` → attention → residual, ``ln_2`` → MLP → residual), ``ln_f``;
- the fused ``c_attn`` (``Conv1D``: weight ``[in, out]``, :class:`Linear` ``transposed=True``)
  split into q, k, v; scores scaled by ``head_dim ** -0.5`` when ``scale_attn_weights`` and by
  ``1 / (layer_idx + 1)`` when ``scale_attn_by_inverse_layer_idx``; ``reorder_and_upcast_attn``
  computes the scores from float32 q, k (transformers' eager ``_upcast_and_reordered_attn``; in
  float32 it is the same computation);
- MLP ``c_fc`` → ``ACT2FN[activation_function]`` (:data:`ACTIVATIONS`) → ``c_proj``, inner width
  ``n_inner`` (null: ``4 * n_embd``);
- output head tied to ``wte`` (``tie_word_embeddings``, default true), or an untied bias-free
  ``lm_head`` (``nn.Linear``).

Every key of a config.json falls under one rule of :data:`HF_FIELDS` (computed, inert, not
applied, refused); ``docs/models/gpt2.md`` lists them with the reasons. ``add_cross_attention``
and the generic refused keys are refused by name, as is an ``activation_function`` outside
:data:`ACTIVATIONS` or an ``n_embd`` that ``n_head`` does not divide.

Call: ``model(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]`` (float32).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrad._compat import moved_names
from jaxgrad.models import hf_config
from jaxgrad.models.hf_config import (GENERIC_EXTRAS, GENERIC_FIELDS, Reader, field_table,
                                      resolve_config_dtypes)
from jaxgrad.models.layers import (CausalLM, Embed, LayerNorm, Linear, causal_mask, mask_value,
                                   split_rng)

__getattr__ = moved_names(__name__)  # names that moved out of this module (jaxgrad._compat)

DOC = "docs/models/gpt2.md"  # refusals point to this family's table of config.json keys

MODEL_TYPE = "gpt2"


def _gelu_tanh_fast(x):  # FastGELUActivation: 0.5 x (1 + tanh(x 0.7978845608 (1 + 0.044715 x²)))
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


# transformers.activations.ACT2FN names with the function each computes (every one checked
# against ACT2FN by tests/models/test_gpt2.py). Others (`laplace`, `sqrtsoftplus`, `xielu`, `prelu`
# with its learned slope, ...) are refused by name.
ACTIVATIONS = {
    **hf_config.ACTIVATIONS,  # silu, swish, relu, gelu (erf), gelu_new, gelu_pytorch_tanh
    "gelu_python": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_python_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_accurate": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": _gelu_tanh_fast,
    "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),  # nn.LeakyReLU()
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}

# GPT2Config.attribute_map aliases: a (non-null) value under one of these names wins.
ATTRIBUTE_MAP = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                 "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
# config.json key -> (transformers' default, rule). The GPT2Config fields and defaults are those
# of the installed transformers (checked by tests/models/test_gpt2.py), and the further keys that
# modeling_gpt2.py / masking_utils.py read.
HF_FIELDS: dict[str, tuple[Any, str]] = field_table(
    GENERIC_FIELDS, GENERIC_EXTRAS,
    computed=dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                  n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                  scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                  reorder_and_upcast_attn=False, tie_word_embeddings=True,
                  **dict.fromkeys(ATTRIBUTE_MAP)),
    not_applied=dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
    inert=dict(initializer_range=0.02, summary_type="cls_index", summary_use_proj=True,
               summary_activation=None, summary_proj_to_labels=True, summary_first_dropout=0.1,
               use_cache=True, bos_token_id=50256, eos_token_id=50256, pad_token_id=None,
               # not GPT2Config fields; read with hasattr by heads other than the LM head:
               # GPT2DoubleHeadsModel's summary, GPT2ForTokenClassification
               summary_last_dropout=None, classifier_dropout=None, hidden_dropout=None,
               # masking_utils reads them for sliding-window masks GPT2Model never builds
               sliding_window=None, layer_types=None),
    refused=dict(add_cross_attention=False))

_REFUSAL_REASONS = {
    "add_cross_attention": "cross-attention blocks (crossattention, ln_cross_attn over "
                           "encoder_hidden_states) are not implemented",
}


# ---- the typed config ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    model_type: str = MODEL_TYPE
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        resolve_config_dtypes(self)
        if not isinstance(self.activation_function, str) or \
                self.activation_function not in ACTIVATIONS:
            raise ValueError(f"GPT2Config: activation_function={self.activation_function!r} is "
                             f"not supported; supported: {', '.join(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} is not divisible by "
                             f"n_head={self.n_head}")

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    def attention_scaling(self, layer_idx: int) -> float:
        """``GPT2Attention.scaling`` of layer ``layer_idx``."""
        scaling = self.head_dim ** -0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scaling /= float(layer_idx + 1)
        return scaling

    @classmethod
    def from_hf(cls, cfg: dict, *, dtype=jnp.float32, param_dtype=jnp.float32,
                source: str = "config.json") -> GPT2Config:
        """Build from a Hugging Face ``config.json`` dictionary (transformers 5 semantics).

        Missing keys take GPT2Config's defaults, an ``attribute_map`` alias (``hidden_size``,
        ``num_attention_heads``, ...) wins over its field; keys that change the computation in a
        way jaxgrad does not reproduce raise ValueError naming ``source``, the key and its value.
        """
        model_type = cfg.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{source}: model_type={model_type!r} is not {MODEL_TYPE!r}")
        get = Reader(cfg, HF_FIELDS, source, doc=DOC, aliases=ATTRIBUTE_MAP)
        for name, why in _REFUSAL_REASONS.items():
            if name in cfg and cfg[name] != HF_FIELDS[name][0]:
                get.refuse(name, cfg[name], why)
        get.check_refused()
        dims = {name: get.positive_int(name)
                for name in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")}
        if dims["n_embd"] % dims["n_head"]:
            get.refuse(get.field("n_head")[1], dims["n_head"],
                       f"it does not divide n_embd={dims['n_embd']} (transformers raises too)")
        return cls(
            **dims,
            n_inner=get.positive_int("n_inner", or_none=True),
            activation_function=get.option("activation_function", ACTIVATIONS),
            layer_norm_epsilon=float(get.number("layer_norm_epsilon")),
            scale_attn_weights=bool(get("scale_attn_weights")),
            scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx")),
            reorder_and_upcast_attn=bool(get("reorder_and_upcast_attn")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            dtype=dtype,
            param_dtype=param_dtype,
        )


def to_hf_config(cfg: GPT2Config) -> dict:
    """The Hugging Face ``config.json`` dictionary of ``cfg`` (inverse of ``from_hf``)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.n_inner,
        "activation_function": cfg.activation_function,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": cfg.reorder_and_upcast_attn,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": "float32",
    }


# ---- modules ----------------------------------------------------------------------------------------


def _conv1d(n_in: int, n_out: int, cfg: GPT2Config, rngs: nnx.Rngs) -> Linear:
    """transformers' ``Conv1D(n_out, n_in)``: weight ``[in, out]`` and a bias."""
    return Linear(n_in, n_out, use_bias=True, transposed=True, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, rngs=rngs)


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer_idx = int(layer_idx)
        self.c_attn = _conv1d(cfg.n_embd, 3 * cfg.n_embd, cfg, rngs)
        self.c_proj = _conv1d(cfg.n_embd, cfg.n_embd, cfg, rngs)

    def __call__(self, x, mask_BxLxL, dropout_rng=None):
        cfg = self.cfg
        b, l, e = x.shape
        nh, dh = cfg.n_head, cfg.head_dim
        r_attn, r_proj = split_rng(dropout_rng, 2)
        q, k, v = jnp.split(self.c_attn(x, r_attn), 3, axis=-1)
        q, k, v = (t.reshape(b, l, nh, dh) for t in (q, k, v))
        scaling = cfg.attention_scaling(self.layer_idx)
        if cfg.reorder_and_upcast_attn:  # _upcast_and_reordered_attn: q, k in float32
            scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32),
                                k.astype(jnp.float32)) * scaling
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scaling
        scores = jnp.where(mask_BxLxL[:, None], scores, mask_value(jnp.float32))
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, e)
        return self.c_proj(out, r_proj)


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.activation_function = cfg.activation_function
        self.c_fc = _conv1d(cfg.n_embd, cfg.inner_dim, cfg, rngs)
        self.c_proj = _conv1d(cfg.inner_dim, cfg.n_embd, cfg, rngs)

    def __call__(self, x, dropout_rng=None):
        r_fc, r_proj = split_rng(dropout_rng, 2)
        act = ACTIVATIONS[self.activation_function]
        return self.c_proj(act(self.c_fc(x, r_fc)), r_proj)


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, **kw)
        self.attn = GPT2Attention(cfg, layer_idx, rngs=rngs)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, **kw)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def __call__(self, x, mask, dropout_rng=None):
        r_attn, r_mlp = split_rng(dropout_rng, 2)
        x = x + self.attn(self.ln_1(x), mask, r_attn)
        return x + self.mlp(self.ln_2(x), r_mlp)


class GPT2Model(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, **kw)
        self.wpe = Embed(cfg.n_positions, cfg.n_embd, **kw)
        self.h = nnx.List([GPT2Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, attention_mask=None, dropout_rng=None):
        cfg = self.cfg
        b, l = input_ids.shape
        if l > cfg.n_positions:
            raise ValueError(
                f"GPT-2: a sequence of {l} tokens is longer than n_positions={cfg.n_positions} "
                f"(config.json): the learned position table wpe has {cfg.n_positions} rows; "
                f"truncate or split inputs to at most {cfg.n_positions} tokens")
        mask = causal_mask(attention_mask, b, l)
        x = self.wte(input_ids) + self.wpe(jnp.arange(l))[None]
        for block, r in zip(self.h, split_rng(dropout_rng, len(self.h))):
            x = block(x, mask, r)
        return self.ln_f(x)


class GPT2LMHeadModel(CausalLM, nnx.Module):
    """Causal LM head over :class:`GPT2Model`; returns float32 logits ``[B, L, V]``."""

    # the family's checkpoint and LoRA names (jaxgrad.models.hub, jaxgrad.models.lora)
    BASE_PREFIX = "transformer"  # transformers' base_model_prefix
    EMBED_KEYS = ("transformer.wte.weight",)
    OUTPUT_HEAD = "lm_head"
    # GPT2PreTrainedModel._keys_to_ignore_on_load_unexpected ("attn.bias",
    # "crossattention.bias": the causal-mask buffers older checkpoints saved, the Hub's gpt2
    # among them) and transformers 4's "attn.masked_bias" scalar buffer; with and without the
    # base-model prefix.
    IGNORED_KEYS = (r"(transformer\.)?h\.\d+\.(attn|crossattention)\.(bias|masked_bias)",)
    LORA_TARGETS = ("c_attn",)  # the paper's q, k, v: fused in c_attn
    PEFT_TARGETS = ("c_attn",)  # peft TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["gpt2"]

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.transformer = GPT2Model(cfg, rngs=rngs)
        # nn.Linear(n_embd, vocab_size, bias=False), or tied to wte
        self._init_head(cfg.n_embd, cfg.vocab_size, cfg.tie_word_embeddings, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, rngs=rngs)

    def hidden_states(self, input_ids, attention_mask=None, dropout_rng=None) -> jax.Array:
        """The final normed hidden states ``[B, L, n_embd]`` (after ``ln_f``, compute dtype).

        Raises:
          ValueError: ``L`` exceeds ``n_positions``.
        """
        return self.transformer(input_ids, attention_mask, dropout_rng)
