"""The optimizer: ``clip_by_global_norm`` then AdamW (or plain SGD; weight decay on matrices only)
with a linear warmup followed by a cosine, linear or constant schedule."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxgrad.config import TrainConfig


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then ``cfg.schedule`` down to ``end_lr_ratio * learning_rate``.

    Args:
      cfg: the ``train`` config (``learning_rate``, ``warmup_steps``, ``schedule`` in
        ``constant`` / ``linear`` / ``cosine``, ``end_lr_ratio``).
      total_steps: optimizer steps of the run (warmup included; warmup is capped at it).

    Returns:
      An ``optax.Schedule``, step -> learning rate (optax's ``linear_schedule``,
      ``cosine_decay_schedule``, ``join_schedules``).
    """
    lr = float(cfg.learning_rate)
    warm = min(int(cfg.warmup_steps), int(total_steps))
    decay = max(int(total_steps) - warm, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, lr * cfg.end_lr_ratio, decay)
    else:
        after = optax.cosine_decay_schedule(lr, decay, alpha=cfg.end_lr_ratio)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (when ``max_grad_norm > 0``) then AdamW, or SGD, on the schedule.

    ``optimizer="sgd"`` is plain gradient descent (no momentum): the update is ``-lr·g`` (plus
    ``-lr·weight_decay·p`` on matrices when ``weight_decay > 0``, as AdamW's decoupled decay).

    Args:
      cfg: the ``train`` config (``optimizer``, ``max_grad_norm``, ``weight_decay``,
        ``adam_b1``/``adam_b2``/``adam_eps`` and the schedule's keys, :func:`make_schedule`).
      total_steps: optimizer steps of the run.

    Returns:
      An ``optax.GradientTransformation`` (``optax.chain``); weight decay masked to leaves of
      ndim >= 2.
    """
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    schedule = make_schedule(cfg, total_steps)
    if cfg.optimizer == "sgd":
        if cfg.weight_decay > 0:
            parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(schedule))
    else:
        parts.append(optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
