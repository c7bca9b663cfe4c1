"""Building blocks shared by the Llama and T5 modules.

Parameters are stored in PyTorch layout under Hugging Face attribute names (a linear layer's
``weight`` is ``[out_features, in_features]``), so a module path such as
``model.layers.0.self_attn.q_proj.weight`` *is* the safetensors key: loading, PEFT export and
partition rules all work on one naming. XLA folds the transposes into the matmuls.

``Linear`` optionally carries a LoRA adapter (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``,
both ``nnx.LoRAParam``; rank, alpha and rsLoRA scaling per layer), added by model surgery in
:mod:`jaxgrad.models.lora`. LoRA dropout is driven by an explicit ``dropout_rng`` argument rather
than a stateful RNG stream, so the model stays a pure function of (parameters, inputs, key) under
``jit``, ``grad`` and ``vmap``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrad.models.hf_config import ACTIVATIONS

INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = INIT_STD) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """LoRA's output scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA (peft ``use_rslora``)."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else float(rank))


class Linear(nnx.Module):
    """``y = x Wᵀ + b`` with an optional LoRA branch ``scaling · dropout(x) Aᵀ Bᵀ``.

    ``weight`` is ``[out, in]`` (``torch.nn.Linear``), or ``[in, out]`` with ``transposed=True``:
    the layout of transformers' ``Conv1D`` (GPT-2), so its checkpoint tensors load unchanged.
    The adapter's ``lora_A [r, in]`` / ``lora_B [out, r]`` are the same in both layouts, as in
    peft (whose ``fan_in_fan_out=True`` transposes only the merged delta for ``Conv1D``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        transposed: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.transposed = bool(transposed)
        self.dtype = dtype
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.weight = nnx.Param(_normal(rngs, shape, param_dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
        # LoRA state; filled in by `add_lora`.
        self.lora_A = nnx.data(None)
        self.lora_B = nnx.data(None)
        self.lora_alpha = 0.0
        self.lora_rslora = False
        self.lora_scaling = 0.0
        self.lora_dropout = 0.0

    def add_lora(self, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs, dtype=jnp.float32,
                 *, use_rslora: bool = False):
        """Attach a LoRA adapter: A ~ Kaiming-uniform (as PEFT), B = 0 so the output is unchanged.

        ``lora_A [rank, in]``, ``lora_B [out, rank]`` in ``dtype``; the scaling is
        :func:`lora_scaling` ``(alpha, rank, use_rslora)``.
        """
        bound = 1.0 / jnp.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) bound for fan_in
        a = jax.random.uniform(rngs.params(), (rank, self.in_features), jnp.float32, -bound, bound)
        self.lora_A = nnx.LoRAParam(a.astype(dtype))
        self.lora_B = nnx.LoRAParam(jnp.zeros((self.out_features, rank), dtype))
        self.set_lora_alpha(alpha, use_rslora)
        self.lora_dropout = float(dropout)

    def set_lora_alpha(self, alpha: float, use_rslora: bool = False):
        """Set the adapter's alpha (and rsLoRA flag); the scaling follows from them and the rank."""
        self.lora_alpha = float(alpha)
        self.lora_rslora = bool(use_rslora)
        self.lora_scaling = lora_scaling(alpha, int(self.lora_A.shape[0]), use_rslora)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        lead = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, x.shape[-1])
        w = self.weight[...].astype(self.dtype)
        y = jnp.dot(x, w) if self.transposed else jnp.dot(x, w.T)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_A is not None:
            h = x
            if self.lora_dropout > 0.0 and dropout_rng is not None:
                keep = 1.0 - self.lora_dropout
                mask = jax.random.bernoulli(dropout_rng, keep, h.shape)
                h = jnp.where(mask, h / keep, 0).astype(h.dtype)
            a = self.lora_A[...].astype(self.dtype)
            b = self.lora_B[...].astype(self.dtype)
            lora = jnp.dot(jnp.dot(h, a.T), b.T)
            y = y + (self.lora_scaling * lora).astype(y.dtype)
        return y.reshape(lead + (y.shape[-1],))


class Embed(nnx.Module):
    """Token embedding table ``weight [vocab, hidden]``; ``attend`` gives tied output logits."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs, std: float = INIT_STD):
        self.dtype = dtype
        self.weight = nnx.Param(_normal(rngs, (num_embeddings, features), param_dtype, std))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...h,vh->...v", x, self.weight[...].astype(x.dtype))


@dataclasses.dataclass(frozen=True)
class DecoderSizes:
    """The sizes a decoder family's config starts with, under transformers' names (the Llama,
    Gemma 3 and GPT-NeoX configs extend it; :func:`decoder_stack` builds from them)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


def decoder_stack(cfg: DecoderSizes, layer: type[nnx.Module], *,
                  rngs: nnx.Rngs) -> tuple[Embed, nnx.List]:
    """``(embedding, layers)`` of a decoder stack: the token embedding ``[vocab_size,
    hidden_size]`` in the config's ``dtype`` / ``param_dtype``, then ``num_hidden_layers`` of
    ``layer(cfg, rngs=rngs)``, initialised in that order from ``rngs``."""
    embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  rngs=rngs)
    return embed, nnx.List([layer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class RMSNorm(nnx.Module):
    """RMS normalisation (Llama's RMSNorm and T5's LayerNorm: no mean, no bias), in float32."""

    def __init__(self, features: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = float(eps)
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * normed


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm`` over the last axis (mean and variance in float32), with ``weight``
    and, when ``use_bias``, ``bias`` (GPT-2's ``ln_1``, GPT-NeoX's ``input_layernorm``)."""

    def __init__(self, features: int, eps: float, *, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.eps = float(eps)
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.data(nnx.Param(jnp.zeros((features,), param_dtype)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class GatedMLP(nnx.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: the gated MLP of Llama, Mistral, Qwen2 and
    Gemma 3 (``LlamaMLP`` / ``Gemma3MLP`` in transformers; the attribute names are theirs, so
    module paths equal safetensors keys).

    Args:
      hidden_size, intermediate_size: widths of ``x [..., hidden]`` and of the gate.
      activation: a name of :data:`jaxgrad.models.hf_config.ACTIVATIONS` (``hidden_act``).
      use_bias: biases on the three projections (Llama's ``mlp_bias``).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, *,
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.activation = activation
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, **kw)

    def __call__(self, x, dropout_rng=None):
        rg, ru, rd = split_rng(dropout_rng, 3)
        act = ACTIVATIONS[self.activation]
        return self.down_proj(act(self.gate_proj(x, rg)) * self.up_proj(x, ru), rd)


def causal_mask(attention_mask_BxL: jax.Array | None, batch: int, length: int,
                window: int | None = None) -> jax.Array:
    """``[B, L, L]`` booleans: query i may attend key j iff ``j <= i``, key j is not padding
    (``attention_mask_BxL`` > 0; None: no padding) and, with a ``window``, ``i - j < window``
    (transformers' ``masking_utils`` causal and sliding-window masks)."""
    if attention_mask_BxL is None:
        attention_mask_BxL = jnp.ones((batch, length), jnp.int32)
    query, key = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (key > query - window)
    return allowed[None] & (attention_mask_BxL[:, None, :] > 0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, dtype,
                          scale: float | None = None, divisor: float | None = None) -> jax.Array:
    """Masked softmax attention with grouped key/value heads (transformers' ``eager_attention_
    forward`` with ``repeat_kv``), scores and softmax in float32.

    ``q [B, L, H, D]``, ``k, v [B, S, KV, D]`` with ``H`` a multiple of ``KV``; ``mask
    [B, L, S]`` bool (True: attend); the scores are multiplied by ``scale`` or divided by
    ``divisor``, exactly one given (the two round differently; each family keeps the form it was
    validated with). Returns ``[B, L, H·D]`` in ``dtype`` (the probabilities are cast to it
    before they weight ``v``).

    Raises:
      ValueError: both or neither of ``scale`` and ``divisor``.
    """
    if (scale is None) == (divisor is None):
        raise ValueError("dot_product_attention: give exactly one of scale and divisor")
    b, l, nh, dh = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, l, nkv, nh // nkv, dh)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32)
    scores = scores * scale if divisor is None else scores / divisor
    scores = jnp.where(mask[:, None, None], scores, mask_value(jnp.float32))
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, l, nh * dh)


def split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` independent keys from ``rng``, or ``n`` Nones when dropout is off."""
    if rng is None:
        return [None] * n
    return list(jax.random.split(rng, n))


def mask_value(dtype) -> float:
    """A large negative logit used for masked attention entries (finite: no NaN on empty rows)."""
    return float(jnp.finfo(dtype).min) / 2


def named_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Map from Hugging Face style dotted name (``a.b.0.weight``) to each Variable of ``model``."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            out[".".join(str(p) for p in path)] = node
    return out


class CausalLM:
    """What every decoder family's LM class shares (mix in before ``nnx.Module``): the output
    head, tied or untied, over the decoder stack.

    The class names its parts as the checkpoint does: ``BASE_PREFIX`` the decoder stack (called
    as ``stack(input_ids, attention_mask, dropout_rng)``, returning the final normed hidden
    states), ``EMBED_KEYS[0]`` the input embedding's weight, ``OUTPUT_HEAD`` the head (``None``
    when tied: the logits are then the embedding's ``attend``). Logits are float32 ``[B, L, V]``.
    """

    is_encoder_decoder = False
    BASE_PREFIX: str
    EMBED_KEYS: tuple[str, ...]
    OUTPUT_HEAD = "lm_head"

    def _init_head(self, hidden: int, vocab: int, tied: bool, *, dtype, param_dtype,
                   rngs: nnx.Rngs) -> None:
        """Set ``OUTPUT_HEAD``: ``None`` when tied, else a bias-free ``Linear(hidden, vocab)``."""
        head = nnx.data(None) if tied else Linear(hidden, vocab, dtype=dtype,
                                                  param_dtype=param_dtype, rngs=rngs)
        setattr(self, self.OUTPUT_HEAD, head)

    def input_embedding(self) -> Embed:
        node = self
        for part in self.EMBED_KEYS[0].split(".")[:-1]:
            node = getattr(node, part)
        return node

    def hidden_states(self, input_ids, attention_mask=None, dropout_rng=None) -> jax.Array:
        """The decoder stack's final normed hidden states ``[B, L, hidden]`` (compute dtype)."""
        return getattr(self, self.BASE_PREFIX)(input_ids, attention_mask, dropout_rng)

    def output_logits(self, h: jax.Array) -> jax.Array:
        """Logits of hidden states ``h`` in the compute dtype (a family may post-process them)."""
        head = getattr(self, self.OUTPUT_HEAD)
        return self.input_embedding().attend(h) if head is None else head(h)

    def __call__(self, input_ids, attention_mask=None, *, dropout_rng=None) -> jax.Array:
        h = self.hidden_states(input_ids, attention_mask, dropout_rng)
        return self.output_logits(h).astype(jnp.float32)
