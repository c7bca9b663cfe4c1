"""The pure training and evaluation steps, module-level functions of
``(graphdef, trainable, frozen, opt_state, batch, rng)``.

The model is split once (:func:`jaxgrad.models.lora.split_trainable`: ``nnx.LoRAParam`` for LoRA,
``nnx.Param`` for full fine-tuning, LoRA factors included) and merged inside the step, so
gradients are taken with respect to the trainable state only and the frozen base is never
differentiated or copied. :func:`jaxgrad.train.loop.run_training` jits them with explicit
shardings and donates the trainable and optimizer buffers.

Gradient accumulation is a ``lax.scan`` over ``k`` micro-batches inside one step (not
``optax.MultiSteps``): every micro-batch's summed cross-entropy is divided by the token count of
the *whole* batch, so the accumulated gradient is exactly that of the big batch even when
micro-batches hold different numbers of target tokens (``MultiSteps`` averages per-micro-batch
means, which differs), and one optimizer update, one schedule step and one checkpoint step
correspond to one global batch. Micro-batch ``i`` takes rows ``i, i + k, i + 2k, ...`` so that
each data shard contributes to every micro-batch without moving rows between devices.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgrad.models.forward import model_logits
from jaxgrad.train.losses import batch_loss, batch_token_count, token_ce_sums


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
    """``[B, ...] -> [k, B/k, ...]`` with micro-batch ``i`` = rows ``i, i+k, ...`` (strided)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def loss_and_grads(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State,
                   batch: Mapping[str, jax.Array], rng: jax.Array | None, *,
                   grad_accum_steps: int = 1) -> tuple[jax.Array, nnx.State]:
    """Batch loss and its gradient w.r.t. ``trainable``, over ``grad_accum_steps`` micro-batches.

    The result does not depend on ``grad_accum_steps`` (up to float summation order): each
    micro-batch's summed cross-entropy is divided by the whole batch's token count.

    Args:
      graphdef, trainable, frozen: the model split by ``split_trainable``.
      batch: arrays with a leading batch axis B (``targets``, ``target_mask``, ``valid`` and the
        model's inputs).
      rng: LoRA dropout key (each micro-batch folds in its index), or None for no dropout.
      grad_accum_steps: k micro-batches; B must be divisible by k.

    Returns:
      ``(loss, grads)``: the float32 scalar loss (nats per target token) and gradients with
      ``trainable``'s structure and dtypes.

    Raises:
      ValueError: B not divisible by ``grad_accum_steps``.
    """
    normalizer = batch_token_count(batch)

    def micro_loss(params, micro, key):
        return batch_loss(nnx.merge(graphdef, params, frozen), micro, dropout_rng=key,
                          normalizer=normalizer)

    grad_fn = jax.value_and_grad(micro_loss)
    k = int(grad_accum_steps)
    if k == 1:
        return grad_fn(trainable, batch, rng)
    rows = next(iter(batch.values())).shape[0]
    if rows % k:
        raise ValueError(f"batch of {rows} rows does not split into grad_accum_steps={k} "
                         "micro-batches")
    micro = {name: _micro_batches(x, k) for name, x in batch.items()}
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)

    def body(carry, xs):
        loss_sum, grad_sum = carry
        i, mb = xs
        key = None if rng is None else jax.random.fold_in(rng, i)
        loss, grads = grad_fn(trainable, mb, key)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss, grad_sum), None

    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(k), micro))
    return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)


def train_step(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State, opt_state: Any,
               batch: Mapping[str, jax.Array], rng: jax.Array | None, *,
               tx: optax.GradientTransformation, grad_accum_steps: int = 1):
    """One optimizer step; returns ``(trainable, opt_state, metrics)``.

    ``metrics`` holds the batch ``loss`` (before the update) and the unclipped ``grad_norm``.

    Args:
      graphdef, trainable, frozen, batch, rng, grad_accum_steps: as :func:`loss_and_grads`.
      opt_state: ``tx``'s state for ``trainable``.
      tx: the optimizer (:func:`jaxgrad.train.optim.make_optimizer`).

    Raises:
      ValueError: as :func:`loss_and_grads`.
    """
    loss, grads = loss_and_grads(graphdef, trainable, frozen, batch, rng,
                                 grad_accum_steps=grad_accum_steps)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


def eval_step(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State,
              batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-example summed cross-entropy and target-token count, ``[B]`` each (0 on padding rows).

    Per-source or per-example means are ratios of sums of these (computed on the host).

    Args:
      graphdef, trainable, frozen: the model split by ``split_trainable``.
      batch: a batch with ``targets``, ``target_mask``, ``valid`` and the model's inputs.

    Returns:
      ``{"ce_sum": [B] float32 (nats), "tokens": [B] float32}``.
    """
    logits = model_logits(nnx.merge(graphdef, trainable, frozen), batch)
    sums, counts = token_ce_sums(logits, batch["targets"], batch["target_mask"])
    valid = jnp.asarray(batch["valid"], jnp.float32)
    return {"ce_sum": sums * valid, "tokens": counts * valid}
