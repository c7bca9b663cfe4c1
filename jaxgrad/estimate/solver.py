"""The batched logistic solver behind :func:`jaxgrad.estimate.surrogate.fit_subsets`.

:func:`solve_chunk` minimises, for a chunk of S subsets at once,
``½‖v‖² + C Σ_i m_si softplus(-(o_i + b_iᵀ v_s))`` by preconditioned nonlinear conjugate
gradients with an exact-curvature line search (:func:`_line_search`), in a ``lax.while_loop``
that stops each subset on its own (gradient tolerance, or no progress for ``_STALL_ITERS``
iterations). :func:`gram_eigenbasis` gives the rotation of the "eig" preconditioner;
:func:`init_vector` the warm start. :class:`SubsetFits` is the result type.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxgrad.common.checks import matmul_highest

_LINE_SEARCH_STEPS = 2
_STALL_ITERS = 30  # stop a subset whose gradient norm has not improved by 0.1% for this long
_STALL_GAIN = 1e-3
_RECOMPUTE_MARGINS_EVERY = 25


@jax.jit
def gram_eigenbasis(a_NxK: jax.Array) -> jax.Array:
    """Eigenvectors (k'×k', orthogonal) of AᵀA."""
    gram = matmul_highest(a_NxK.T, a_NxK)
    _, q = jnp.linalg.eigh(gram)
    return q


@functools.partial(jax.jit, static_argnames=("max_iter", "warm", "diag"))
def solve_chunk(b_NxK, o_N, m_SxN, v_SxK, C, tol, *, max_iter, warm, diag=True):
    """Preconditioned nonlinear CG for ``½‖v‖² + C Σ_i m_si softplus(-(o_i + b_iᵀv_s))``.

    ``warm`` is False when v_SxK is all zeros (the margins are then just the offsets).
    ``diag``: the diagonal preconditioner; False: none (plain nonlinear CG, one matmul less).
    Returns (v S×k', converged S, n_iter S, grad_norm S).
    """
    eps = jnp.finfo(b_NxK.dtype).eps
    weigh = _weigher(m_SxN)

    def margins(v):
        return o_N[None, :] + matmul_highest(v, b_NxK.T)

    def gradient(v, z):
        """∇f, the inverse diagonal preconditioner and the weighted curvatures m·σ(1-σ)."""
        s = jax.nn.sigmoid(-z)  # -dℓ/dz of ℓ(z) = softplus(-z)
        ms = weigh(s)
        g = v - C * matmul_highest(ms, b_NxK)
        curv_SxN = ms - ms * s  # m·σ(1-σ), written without a broadcast constant 1
        if not diag:
            return g, jnp.ones((), g.dtype), curv_SxN
        pinv = 1.0 / (1.0 + C * matmul_highest(curv_SxN, jnp.square(b_NxK)))
        return g, pinv, curv_SxN

    def norms(g, v):
        return jnp.linalg.norm(g, axis=1), jnp.linalg.norm(v, axis=1)

    z = margins(v_SxK) if warm else jnp.broadcast_to(o_N[None, :], m_SxN.shape).astype(b_NxK.dtype)
    g, pinv, curv = gradient(v_SxK, z)
    pg = pinv * g
    gnorm, vnorm = norms(g, v_SxK)
    converged = (gnorm <= tol * vnorm) | (gnorm == 0)
    zeros_i = jnp.zeros(gnorm.shape, jnp.int32)
    state = dict(it=jnp.int32(0), v=v_SxK, z=z, curv=curv, g=g, pg=pg, d=-pg, gnorm=gnorm,
                 converged=converged, active=~converged, n_iter=zeros_i, best=gnorm,
                 stall=zeros_i)

    def cond(st):
        return (st["it"] < max_iter) & jnp.any(st["active"])

    def body(st):
        v, z, g, pg, d, active = st["v"], st["z"], st["g"], st["pg"], st["d"], st["active"]
        u = matmul_highest(d, b_NxK.T)
        alpha = _line_search(v, g, d, z, u, weigh, st["curv"], C, eps)
        alpha = jnp.where(active, alpha, 0.0)
        v = v + alpha[:, None] * d
        z = lax.cond((st["it"] + 1) % _RECOMPUTE_MARGINS_EVERY == 0,
                     lambda: margins(v), lambda: z + alpha[:, None] * u)
        g_new, pinv, curv = gradient(v, z)
        pg_new = pinv * g_new
        # Polak–Ribière+ with the (changing) preconditioner; restart if not a descent direction.
        beta = jnp.sum(g_new * (pg_new - pg), 1) / jnp.sum(g * pg, 1)
        beta = jnp.where(jnp.isfinite(beta), jnp.maximum(beta, 0.0), 0.0)
        d_new = -pg_new + beta[:, None] * d
        d_new = jnp.where((jnp.sum(d_new * g_new, 1) < 0)[:, None], d_new, -pg_new)
        gnorm, vnorm = norms(g_new, v)
        converged = (gnorm <= tol * vnorm) | (gnorm == 0)
        improved = gnorm < st["best"] * (1 - _STALL_GAIN)
        stall = jnp.where(improved, 0, st["stall"] + 1)
        keep = active[:, None]
        return dict(
            it=st["it"] + 1, v=v, z=z, curv=curv,
            g=jnp.where(keep, g_new, g), pg=jnp.where(keep, pg_new, pg),
            d=jnp.where(keep, d_new, d),
            gnorm=jnp.where(active, gnorm, st["gnorm"]),
            converged=jnp.where(active, converged, st["converged"]),
            active=active & ~converged & (stall < _STALL_ITERS),
            n_iter=st["n_iter"] + active.astype(jnp.int32),
            best=jnp.where(active, jnp.minimum(st["best"], gnorm), st["best"]),
            stall=jnp.where(active, stall, st["stall"]),
        )

    st = lax.while_loop(cond, body, state)
    return st["v"], st["converged"], st["n_iter"], st["gnorm"]


def _weigher(m_SxN):
    """x ↦ m·x for the mask (a select for boolean masks)."""
    if m_SxN.dtype == jnp.bool_:
        return lambda x: jnp.where(m_SxN, x, jnp.zeros((), x.dtype))
    return lambda x: m_SxN * x


def _line_search(v, g, d, z, u, weigh, curv_SxN, C, eps):
    """Step α along the descent direction d, per row, for the convex
    φ(α) = ½‖v + αd‖² + C Σ m softplus(-(z + αu)), with φ'(0) = gᵀd.

    The first trial is the Newton step from 0 (curvature ``dᵀd + C Σ m σ(1-σ) u²`` from the
    stored curvatures, no exp). Each of ``_LINE_SEARCH_STEPS`` evaluations of φ', φ'' at the trial
    point narrows a bracket [lo, hi] of the minimiser (φ'(lo) < 0 ≤ φ'(hi)); the next trial is
    the Newton step if it falls inside the bracket, else the secant step of φ' on the bracket
    (or Newton beyond lo while the bracket is open). The result is either the last trial point
    with φ' < 0 (so φ decreased) or a point inside a closed bracket. Rows whose φ' is at
    rounding level stop moving.
    """
    vd, dd, gd = jnp.sum(v * d, 1), jnp.sum(d * d, 1), jnp.sum(g * d, 1)
    d2_at_0 = dd + C * jnp.sum(curv_SxN * u * u, 1)
    alpha = -gd / d2_at_0
    lo, dlo = jnp.zeros_like(vd), gd
    hi, dhi = jnp.full_like(vd, jnp.inf), jnp.zeros_like(vd)
    settled = gd >= 0  # not a descent direction (only at rounding level): no step
    for _ in range(_LINE_SEARCH_STEPS):
        s = jax.nn.sigmoid(-(z + alpha[:, None] * u))
        msu = weigh(s * u)
        msuu = msu * u
        loss_slope = C * jnp.sum(msu, 1)
        dphi = vd + alpha * dd - loss_slope
        d2phi = dd + C * jnp.sum(msuu - msuu * s, 1)
        at_noise = jnp.abs(dphi) <= 16 * eps * (jnp.abs(vd) + alpha * dd + jnp.abs(loss_slope))
        below = dphi < 0
        lo, dlo = jnp.where(below, alpha, lo), jnp.where(below, dphi, dlo)
        hi, dhi = jnp.where(below, hi, alpha), jnp.where(below, dhi, dphi)
        newton = alpha - dphi / d2phi
        secant = lo - dlo * (hi - lo) / (dhi - dlo)
        inside = jnp.isfinite(newton) & (newton > lo) & (newton < hi)
        nxt = jnp.where(inside, newton, jnp.where(jnp.isinf(hi), 2 * alpha, secant))
        settled = settled | at_noise
        alpha = jnp.where(settled, alpha, nxt)
    # An open bracket: keep the farthest point known to descend, not an untested extrapolation.
    alpha = jnp.where(settled | jnp.isfinite(hi), alpha, lo)
    return jnp.where((dd > 0) & (gd < 0), alpha, 0.0)


def init_vector(init, n_subsets, k, fit_intercept, intercept_scaling, dtype):
    if not isinstance(init, SubsetFits):
        raise TypeError(f"init must be a SubsetFits (e.g. from fit_subsets), got {type(init)}")
    coef = jnp.asarray(init.coef, dtype)
    if coef.shape != (n_subsets, k):
        raise ValueError(f"init.coef must have shape (S, k) = {(n_subsets, k)}, got {coef.shape}")
    if not bool(jnp.all(jnp.isfinite(coef))):
        raise ValueError("init.coef has NaN or inf entries")
    if not fit_intercept:
        return coef
    b = jnp.asarray(init.intercept, dtype).reshape(-1)
    if b.shape != (n_subsets,):
        raise ValueError(f"init.intercept must have shape (S,) = ({n_subsets},), got {b.shape}")
    return jnp.concatenate([coef, (b / intercept_scaling)[:, None]], axis=1)


class SubsetFits(NamedTuple):
    """Per-subset logistic fits (a pytree of arrays, S = number of subsets).

    Attributes:
      coef: S×k coefficients w (liblinear's ``coef_`` for gradex).
      intercept: S intercepts b (0 without an intercept).
      converged: S booleans, the stopping rule ``‖∇f‖₂ ≤ tol·‖v‖₂`` was met.
      n_iter: S iteration counts (0 for an empty subset).
      grad_norm: S final gradient norms ‖∇f(v)‖₂ of ``½‖v‖² + C·Σ loss``, a bound on the
        distance of ``v = [w, b/intercept_scaling]`` to the exact optimum.
    """

    coef: jax.Array
    intercept: jax.Array
    converged: jax.Array
    n_iter: jax.Array
    grad_norm: jax.Array
