"""Token cross-entropy on a batch: the training loss.

A batch (see :mod:`jaxgrad.data.batching`) holds ``targets [B, L]`` (the token each position
predicts), ``target_mask [B, L]`` (1 on completion tokens, eos included) and ``valid [B]`` (0 on
padding rows). For an encoder–decoder the targets are aligned with the decoder positions.

The training loss is the token-weighted mean over the batch,

    loss = Σ_b Σ_t valid_b · mask_bt · CE_bt  /  Σ_b Σ_t valid_b · mask_bt,

so every completion token counts once, whatever example it belongs to. :func:`token_ce_sums`
returns the numerator and denominator per example; gradient accumulation
(:func:`jaxgrad.train.step.train_step`) divides every micro-batch's numerator by the *whole* batch's
denominator, which makes k micro-batches add up to exactly one big-batch step.

Models are called on a batch through :func:`jaxgrad.models.forward.model_logits`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgrad.models.forward import Batch, model_logits


def token_cross_entropy(logits_BxLxV: jax.typing.ArrayLike, targets_BxL: jax.typing.ArrayLike,
                        target_mask_BxL: jax.typing.ArrayLike) -> jax.Array:
    """Mean cross-entropy over each example's target tokens, ``[B]`` (0 where none).

    Args:
      logits_BxLxV: [B, L, V] logits, any float dtype (computed in float32).
      targets_BxL: [B, L] int gold token ids.
      target_mask_BxL: [B, L], 1 on target tokens (float or int).

    Returns:
      [B] float32 cross-entropy in nats (optax ``softmax_cross_entropy_with_integer_labels``).

    Raises:
      ValueError: shapes other than [B, L, V], [B, L], [B, L].

    Example:
      >>> logits = jnp.zeros((1, 2, 4))  # uniform over 4 tokens
      >>> token_cross_entropy(logits, jnp.array([[1, 2]]), jnp.array([[1.0, 1.0]]))
      Array([1.3862944], dtype=float32)
    """
    sums, counts = token_ce_sums(logits_BxLxV, targets_BxL, target_mask_BxL)
    return sums / jnp.maximum(counts, 1.0)


def token_ce_sums(logits_BxLxV: jax.typing.ArrayLike, targets_BxL: jax.typing.ArrayLike,
                  target_mask_BxL: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Per example: the summed cross-entropy over target tokens and their number, both ``[B]``.

    Args:
      logits_BxLxV: [B, L, V] logits, any float dtype (computed in float32).
      targets_BxL: [B, L] int gold token ids.
      target_mask_BxL: [B, L] token weights, 1 on target tokens.

    Returns:
      ``(sums, counts)``: [B] float32 summed cross-entropy (nats) and [B] float32 mask sums.

    Raises:
      ValueError: shapes other than [B, L, V], [B, L], [B, L].
    """
    logits = jnp.asarray(logits_BxLxV, jnp.float32)
    targets = jnp.asarray(targets_BxL, jnp.int32)
    mask = jnp.asarray(target_mask_BxL, jnp.float32)
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(f"token_ce_sums: expected logits [B, L, V], targets and target_mask "
                         f"[B, L]; got {logits.shape}, {targets.shape}, {mask.shape}")
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce_BxL * mask, axis=-1), jnp.sum(mask, axis=-1)


def batch_token_count(batch: Batch) -> jax.Array:
    """``Σ valid · target_mask``: the loss denominator of a batch (at least 1).

    Args:
      batch: a batch with ``target_mask [B, L]`` and ``valid [B]``.

    Returns:
      A float32 scalar, the number of target tokens in non-padding rows (>= 1).
    """
    mask = jnp.asarray(batch["target_mask"], jnp.float32)
    valid = jnp.asarray(batch["valid"], jnp.float32)
    return jnp.maximum(jnp.sum(mask * valid[:, None]), 1.0)


def batch_loss(model_or_fn: Any | Callable[[Batch], jax.Array], batch: Batch, *,
               dropout_rng: jax.Array | None = None,
               normalizer: jax.typing.ArrayLike | None = None) -> jax.Array:
    """Token-weighted mean cross-entropy of a batch (padding rows excluded), a scalar.

    Args:
      model_or_fn: a model (called through :func:`model_logits`) or any ``fn(batch) -> logits``.
      batch: a batch with ``targets``, ``target_mask``, ``valid`` and the model's inputs.
      dropout_rng: LoRA dropout key (models only; None = no dropout).
      normalizer: divide the summed cross-entropy by this instead of the batch's own token count
        (gradient accumulation passes the token count of the whole batch).
    """
    if isinstance(model_or_fn, nnx.Module):
        logits = model_logits(model_or_fn, batch, dropout_rng)
    elif callable(model_or_fn):
        logits = model_or_fn(batch)
    else:
        raise TypeError(f"batch_loss: expected a model or a callable batch -> logits, got "
                        f"{type(model_or_fn).__name__}")
    sums, _ = token_ce_sums(logits, batch["targets"], batch["target_mask"])
    total = jnp.sum(sums * jnp.asarray(batch["valid"], jnp.float32))
    return total / (batch_token_count(batch) if normalizer is None else normalizer)
