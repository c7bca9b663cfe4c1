"""From a subset's surrogate coefficients to an estimate of fine-tuning on it (GradEx step 4).

The fitted ``w_S`` (k numbers) is lifted to parameter space, ``Δ_S = c_S · P w_S``, with ``c_S``
(:func:`rescale_factors`) such that ``‖Δ_S‖ = scale · ‖θ*‖``; :func:`lift_updates` forms the
updates. The target metrics of ``θ* + Δ_S`` are estimated to first order from the projected
target gradients (:func:`estimate_subsets`: ``f(θ*) + c_S wᵀ x_j`` per target sample, no model
call) or exactly with one vmapped forward pass per chunk of subsets (:func:`exact_estimates`).
:data:`jaxgrad.config.OUTPUT_FUNCTIONS` are the output functions the estimates understand;
:data:`HIGHER_IS_BETTER` says which direction is better for each estimated metric.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxgrad.common import flat
from jaxgrad.common.checks import matmul_highest, positive_float, positive_int
from jaxgrad.common.sharding import from_host
from jaxgrad.config import OUTPUT_FUNCTIONS
from jaxgrad.estimate.arrays import (CHUNK_ELEMENTS, HIGHEST, check_coef, check_factors,
                                     check_feats, check_vector, gather_from_mesh, subset_sharding)
from jaxgrad.estimate.solver import SubsetFits
from jaxgrad.gradients.outputs import outputs_loss



# Whether a larger value of each metric returned by estimate_subsets is better.
HIGHER_IS_BETTER = {"loss": False, "accuracy": True, "mean_output": True}


def rescale_factors(coef_SxK: jax.typing.ArrayLike, projector: Any,
                    theta_norm: jax.typing.ArrayLike | None, *, scale: float | None) -> jax.Array:
    """Factors c_S with ‖c_S · P w_S‖ = scale · ‖θ*‖ (or c = 1 when ``scale`` is None).

    ‖P w‖ is exact: √(wᵀ(PᵀP)w) with PᵀP from ``projector.gram()``.

    Args:
      coef_SxK: S×k surrogate coefficients (``SubsetFits.coef``).
      projector: a ``jaxgrad.gradients.projection.Projector`` (anything with ``gram()`` and ``k``), or
        its k×k Gram matrix PᵀP already computed (``gram()`` costs D·k² flops: cache it).
      theta_norm: ‖θ*‖ of the trainable (LoRA) parameters, > 0 (``jaxgrad.common.flat.tree_norm``);
        ignored when ``scale`` is None.
      scale: ‖Δ‖/‖θ*‖ (the paper uses 0.02…0.4), or None for unscaled updates (c = 1).

    Returns:
      S factors (``coef_SxK``'s dtype); 0 where w = 0 (an empty subset), so that its Δ is 0.

    Raises:
      ValueError: ``coef_SxK`` not 2-D; the projector's k or Gram shape differing from k.
      TypeError / ValueError: ``scale`` or ``theta_norm`` not a finite number > 0.
    """
    w = check_coef(coef_SxK)
    if scale is None:
        return jnp.ones((w.shape[0],), w.dtype)
    scale = positive_float("scale", scale)
    theta_norm = positive_float("theta_norm", theta_norm)
    gram = _projector_gram(projector, w.shape[1])
    return _rescale(w, gram.astype(w.dtype), jnp.asarray(scale * theta_norm, w.dtype))


@jax.jit
def _rescale(w_SxK, gram_KxK, target):
    sq = jnp.einsum("sk,kl,sl->s", w_SxK, gram_KxK, w_SxK, precision=HIGHEST)
    norm = jnp.sqrt(jnp.maximum(sq, 0.0))
    return jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 0.0)


def lift_updates(coef_SxK: jax.typing.ArrayLike, c_S: jax.typing.ArrayLike,
                 projector: Any) -> jax.Array:
    """The estimated updates Δ_S = c_S · P w_S (GradEx step 4), via ``projector.lift``.

    Args:
      coef_SxK: S×k surrogate coefficients w_S (``SubsetFits.coef``), float.
      c_S: S rescale factors (:func:`rescale_factors`), or a scalar for all subsets.
      projector: a ``jaxgrad.gradients.projection.Projector`` (``k`` and ``lift(w_SxK)``).

    Returns:
      S×D float32 updates, D = ``projector.dim``, in ``jaxgrad.common.flat`` order.

    Raises:
      ValueError: ``coef_SxK`` not 2-D, ``c_S`` of the wrong shape or not finite, or k differing
        from ``projector.k``.
    """
    w = check_coef(coef_SxK)
    c = check_factors(c_S, w.shape[0], w.dtype)
    if w.shape[1] != projector.k:
        raise ValueError(f"coef_SxK has k = {w.shape[1]} columns but the projector has "
                         f"k = {projector.k}")
    return projector.lift(w * c[:, None])


def estimate_subsets(fits_or_coef: SubsetFits | jax.typing.ArrayLike, c_S: jax.typing.ArrayLike,
                     target_feats_JxK: jax.typing.ArrayLike, target_f_J: jax.typing.ArrayLike,
                     *, output: str = "logit_odds",
                     chunk_size: int | None = None) -> dict[str, jax.Array]:
    """Linearised target metrics of θ* + Δ_S for every subset, in one jitted batched call.

    For target sample j, ``f̂_sj = f_j(θ*) + c_s · x_jᵀ w_s`` (= f_j(θ*) + ⟨g_j, Δ_s⟩ since
    x_j = Pᵀg_j and Δ_s = c_s·P w_s).

    Args:
      fits_or_coef: ``SubsetFits`` or its S×k ``coef``.
      c_S: S rescale factors (``rescale_factors``), or a scalar for all subsets.
      target_feats_JxK: projected gradients x_j of the target's validation samples.
      target_f_J: f_j(θ*) of those samples: logit-odds for ``output="logit_odds"``, per-sample
        cross-entropy for ``"token_ce"``.
      output: ``"logit_odds"`` or ``"token_ce"``.
      chunk_size: subsets per call (default: about 8M entries of f̂ per call).

    Shapes: S subsets, J target samples, k projected dimensions; ``target_feats_JxK`` J×k,
    ``target_f_J`` J, both real (computed in the promoted dtype of coefficients and features).

    Returns:
      A dict of S-vectors (``HIGHER_IS_BETTER`` gives each metric's direction):

      * ``logit_odds``: ``loss`` = mean_j log(1 + exp(-f̂_sj)) (lower is better),
        ``accuracy`` = mean_j [f̂_sj > 0] (higher is better; the gold token holds more than half
        the probability), ``mean_output`` = mean_j f̂_sj (higher is better).
      * ``token_ce``: ``loss`` = mean_j f̂_sj, the linearised cross-entropy (lower is better).
        The surrogate must then have been fitted so that Δ lowers the loss (on gradients of
        -CE), otherwise Δ points uphill.

    Raises:
      ValueError: unknown ``output``; k of features and coefficients differ; shapes of
        ``target_f_J`` / ``c_S`` wrong or entries not finite.
      TypeError: non-real ``target_feats_JxK``.
    """
    if output not in OUTPUT_FUNCTIONS:
        raise ValueError(f"output must be one of {OUTPUT_FUNCTIONS}, got {output!r}")
    coef = fits_or_coef.coef if isinstance(fits_or_coef, SubsetFits) else fits_or_coef
    w = check_coef(coef)
    x_JxK = check_feats("target_feats_JxK", target_feats_JxK)
    if x_JxK.shape[1] != w.shape[1]:
        raise ValueError(f"target_feats_JxK has k = {x_JxK.shape[1]} columns but the "
                         f"coefficients have k = {w.shape[1]}")
    dtype = jnp.promote_types(w.dtype, x_JxK.dtype)
    f_J = check_vector("target_f_J", target_f_J, x_JxK.shape[0], dtype)
    c = check_factors(c_S, w.shape[0], dtype)
    n_subsets, n_target = w.shape[0], x_JxK.shape[0]
    if chunk_size is None:
        chunk_size = max(8, CHUNK_ELEMENTS // max(n_target, 1))
    chunk_size = positive_int("chunk_size", chunk_size)
    parts = [_linearized(w[i:i + chunk_size].astype(dtype), c[i:i + chunk_size],
                         x_JxK.astype(dtype), f_J, output=output)
             for i in range(0, n_subsets, chunk_size)]
    if not parts:
        names = ("loss", "accuracy", "mean_output") if output == "logit_odds" else ("loss",)
        return {name: jnp.zeros((0,), dtype) for name in names}
    return {name: jnp.concatenate([p[name] for p in parts]) for name in parts[0]}


@functools.partial(jax.jit, static_argnames=("output",))
def _linearized(w_SxK, c_S, x_JxK, f_J, *, output):
    f_SxJ = f_J[None, :] + c_S[:, None] * matmul_highest(w_SxK, x_JxK.T)
    loss = outputs_loss(f_SxJ, output, axis=1)
    if output == "token_ce":
        return {"loss": loss}
    return {"loss": loss,
            "accuracy": jnp.mean((f_SxJ > 0).astype(f_SxJ.dtype), axis=1),
            "mean_output": jnp.mean(f_SxJ, axis=1)}


def exact_estimates(loss_fn: Callable[[Any], Any], theta_star: Any,
                    coef_SxK: jax.typing.ArrayLike, c_S: jax.typing.ArrayLike, projector: Any,
                    *, chunk_size: int = 8, mesh: jax.sharding.Mesh | None = None) -> Any:
    """``loss_fn(θ* + Δ_s)`` for every subset s, with Δ_s = c_s·P w_s written into the tree.

    Model-agnostic: θ* is any pytree of trainable parameters laid out in ``jaxgrad.common.flat`` order
    (the order the projected gradients were taken in), ``loss_fn(params)`` any jax-traceable
    function returning a scalar (or a pytree of arrays). Each chunk of subsets is lifted
    (``chunk_size``×D floats), cut into the tree with ``flat.unflatten`` (cast to each leaf's
    dtype), added to θ*, and evaluated with ``jax.vmap(loss_fn)`` in one jitted call.

    Args:
      loss_fn: ``params -> scalar`` (or pytree of arrays), jax-traceable; vmapped over subsets.
      theta_star: θ*, the pytree of trainable parameters (D elements in all).
      coef_SxK: S×k surrogate coefficients (``SubsetFits.coef``), S >= 1.
      c_S: S rescale factors (:func:`rescale_factors`), or a scalar for all subsets.
      projector: the ``jaxgrad.gradients.projection.Projector`` the gradients were projected
        with (``dim`` = D, ``k``, ``lift``); P in Δ_s = c_s·P w_s.
      chunk_size: subsets per jitted call (>= 1); the last chunk is padded with Δ = 0 rows.
      mesh: shard each chunk's subsets over the mesh's ``data`` axis (θ* replicated; the
        chunk is rounded up to a multiple of the axis), as :func:`fit_subsets` does.

    Returns:
      ``loss_fn``'s output with a leading axis of S.

    Raises:
      ValueError: ``theta_star`` has D != ``projector.dim``; S = 0; ``coef_SxK``/``c_S``
        malformed or k != ``projector.k`` (as :func:`lift_updates`).
      TypeError / ValueError: ``chunk_size`` not a positive int.
    """
    w = check_coef(coef_SxK)
    c = check_factors(c_S, w.shape[0], w.dtype)
    chunk_size = positive_int("chunk_size", chunk_size)
    spec = flat.flat_spec(theta_star)
    if spec.size != projector.dim:
        raise ValueError(f"theta_star has D = {spec.size} parameters but the projector has "
                         f"dim = {projector.dim}")
    n_subsets = w.shape[0]
    if n_subsets == 0:
        raise ValueError("exact_estimates needs at least one subset (coef_SxK has S = 0)")
    evaluate = _vmapped_loss(loss_fn, spec)
    chunk = min(chunk_size, n_subsets)
    shard = subset_sharding(mesh)
    if shard is not None:
        ways = mesh.shape["data"]
        chunk = -(-chunk // ways) * ways
        replicated = jax.sharding.NamedSharding(shard.mesh, jax.sharding.PartitionSpec())
        theta_star = jax.tree_util.tree_map(lambda x: from_host(x, replicated), theta_star)
    parts = []
    for i in range(0, n_subsets, chunk):
        w_chunk, c_chunk = w[i:i + chunk], c[i:i + chunk]
        rows = w_chunk.shape[0]
        if rows < chunk:  # pad with Δ = 0 rows: one compiled shape
            w_chunk = jnp.pad(w_chunk, ((0, chunk - rows), (0, 0)))
            c_chunk = jnp.pad(c_chunk, (0, chunk - rows))
        delta = lift_updates(w_chunk, c_chunk, projector)
        if shard is not None:
            out = gather_from_mesh(evaluate(theta_star, from_host(delta, shard)))
        else:
            out = evaluate(theta_star, delta)
        parts.append(jax.tree_util.tree_map(lambda x, rows=rows: x[:rows], out))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)


def _vmapped_loss(loss_fn, spec):
    @jax.jit
    def evaluate(theta, delta_CxD):
        def one(delta_D):
            update = flat.unflatten(delta_D, spec)
            return loss_fn(jax.tree_util.tree_map(jnp.add, theta, update))

        return jax.vmap(one)(delta_CxD)

    return evaluate


def _projector_gram(projector: Any, k: int) -> jax.Array:
    if hasattr(projector, "gram"):
        if getattr(projector, "k", k) != k:
            raise ValueError(f"coef_SxK has k = {k} columns but the projector has "
                             f"k = {projector.k}")
        gram = jnp.asarray(projector.gram())
    else:
        gram = jnp.asarray(projector)
    if gram.shape != (k, k):
        raise ValueError(f"projector Gram matrix must be k×k = {(k, k)}, got {gram.shape}")
    return gram
