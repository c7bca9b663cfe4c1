"""Per-sample output functions f_i(θ) whose gradients GradEx projects.

Both take the model's logits and a batch's ``targets`` / ``target_mask`` (see
:mod:`jaxgrad.data.batching`: ``targets[t]`` is the token that position ``t`` predicts, the mask
is 1 on completion tokens) and return one number per example:

- ``logit_odds`` (the paper's): the mean over target tokens of ``log(p / (1 - p))``, ``p`` the
  softmax probability of the gold token clipped to ``[eps, 1 - eps]``. Its sign says whether the
  model puts more than half its mass on the gold token, which is what the logistic surrogate
  models; a clipped token contributes no gradient.
- ``token_ce``: the mean token cross-entropy (lower is better).

Examples with no target token (padding rows) get 0 and, through the mask, zero gradient.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.config import OUTPUT_FUNCTIONS

OutputFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _gold_logprob(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _masked_mean(values_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    mask = mask_BxL.astype(jnp.float32)
    return jnp.sum(values_BxL * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def logit_odds(logits_BxLxV: jax.Array, targets_BxL: jax.Array, target_mask_BxL: jax.Array,
               eps: float = 1e-6) -> jax.Array:
    """Mean over target tokens of log(p / (1 - p)) per example, ``[B]``.

    Computed as ``z_gold - logsumexp(z_other)`` (exactly log(p / (1 - p)) without forming 1 - p,
    which float32 cannot resolve when p is near 1), then clipped to ``±log((1 - eps) / eps)``:
    the same as clipping p to [eps, 1 - eps], including the zero gradient of a clipped token.
    The paper's output function.

    Args:
      logits_BxLxV: [B, L, V] logits, any float dtype (computed in float32).
      targets_BxL: [B, L] int gold token ids (``targets[t]`` is what position t predicts).
      target_mask_BxL: [B, L], 1 on completion tokens, 0 elsewhere.
      eps: the clip of p, in (0, 0.5).

    Returns:
      [B] float32, in nats (natural-log odds); 0 for a row without target tokens.
    """
    z = logits_BxLxV.astype(jnp.float32)
    targets = targets_BxL.astype(jnp.int32)
    gold = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    is_gold = jnp.arange(z.shape[-1]) == targets[..., None]
    others = jax.nn.logsumexp(jnp.where(is_gold, -jnp.inf, z), axis=-1)
    bound = float(np.log((1.0 - eps) / eps))
    return _masked_mean(jnp.clip(gold - others, -bound, bound), target_mask_BxL)


def token_ce(logits_BxLxV: jax.Array, targets_BxL: jax.Array, target_mask_BxL: jax.Array) -> jax.Array:
    """Mean token cross-entropy per example, ``[B]``.

    Args:
      logits_BxLxV: [B, L, V] logits, any float dtype (computed in float32).
      targets_BxL: [B, L] int gold token ids.
      target_mask_BxL: [B, L], 1 on completion tokens, 0 elsewhere.

    Returns:
      [B] float32 cross-entropy in nats; 0 for a row without target tokens.
    """
    return _masked_mean(-_gold_logprob(logits_BxLxV, targets_BxL), target_mask_BxL)


def get_output_fn(name: str, eps: float = 1e-6) -> OutputFn:
    """The output function called ``name`` (``logit_odds`` or ``token_ce``).

    Args:
      name: ``"logit_odds"`` or ``"token_ce"`` (``jaxgrad.config.OUTPUT_FUNCTIONS``).
      eps: the probability clip of ``logit_odds`` (ignored for ``token_ce``).

    Returns:
      ``f(logits_BxLxV, targets_BxL, target_mask_BxL) -> [B]`` float32.

    Raises:
      ValueError: an unknown ``name``.
    """
    if name == "logit_odds":
        return lambda logits, targets, mask: logit_odds(logits, targets, mask, eps)
    if name == "token_ce":
        return token_ce
    raise ValueError(f"unknown output function {name!r}; expected one of {OUTPUT_FUNCTIONS}")


def outputs_loss(f_J: jax.Array, output: str, axis: int = -1) -> jax.Array:
    """The target loss GradEx estimates, from per-sample outputs f: the mean over samples of
    ``log(1 + exp(-f))`` for ``logit_odds`` (the logistic loss of the logit-odds), of ``f``
    itself for ``token_ce`` (the per-sample cross-entropy).

    The linearized estimates (``jaxgrad.estimate.lift.estimate_subsets``), the exact ones (a forward pass at
    θ* + Δ) and the fidelity check's true fine-tunes all use this, so their numbers compare.

    Args:
      f_J: per-sample outputs (any shape; reduced over ``axis``), float.
      output: ``"logit_odds"`` or ``"token_ce"``.
      axis: the sample axis averaged over.

    Returns:
      The mean loss in nats, ``f_J``'s shape without ``axis``.

    Raises:
      ValueError: an unknown ``output``.
    """
    if output == "token_ce":
        return jnp.mean(f_J, axis=axis)
    if output == "logit_odds":
        return jnp.mean(jax.nn.softplus(-f_J), axis=axis)
    raise ValueError(f"unknown output function {output!r}; expected one of {OUTPUT_FUNCTIONS}")

