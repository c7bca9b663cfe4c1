"""Batched logistic surrogates over subsets of samples (GradEx step 3).

GradEx fits, for every subset S of data sources, an L2-regularised
logistic regression on the projected per-sample gradients ``x_i`` (k numbers) of the samples in
S. Its coefficient ``w_S`` lifted to parameter space, ``Δ_S = c_S · P w_S`` with ``c_S`` chosen so
that ``‖Δ_S‖ = scale · ‖θ*‖``, estimates the fine-tuning update on S, and the target metrics of
``θ* + Δ_S`` are estimated either to first order (``estimate_subsets``) or exactly
(``exact_estimates``). Thousands of subsets are fitted and scored in a few jitted calls.

The three objectives
--------------------
All are ``min_v ½‖v‖² + C Σ_{i∈S} m_i log(1 + exp(-(o_i + a_iᵀ v)))`` over ``v = [w, b/s]``
(``b/s`` only with an intercept; ``s`` the intercept scaling), with per-sample weights ``m_i``
from the mask row (0/1 for a boolean mask):

* ``gradex`` (the paper's): labels ``y_i ~ Bernoulli(0.7)`` drawn once from ``seed`` (or given),
  features ``x'_i = (2y_i - 1)·x_i``, and scikit-learn's ``LogisticRegression(penalty='l2', C,
  solver='liblinear').fit(x', y)`` with its penalised intercept (liblinear appends a constant
  feature ``s = intercept_scaling``). The margin of sample i is ``(2y_i - 1)(wᵀx'_i + b) =
  wᵀx_i + (2y_i - 1)·b``: the label flips cancel on the features, so the seed only enters through
  the intercept column ``a_i = [x_i, (2y_i - 1)·s]`` (and through it, the coefficients).
  ``coef``/``intercept`` equal liblinear's ``coef_``/``intercept_``.
* ``one_class``: every label +1, ``a_i = x_i``, no intercept by default. Deterministic.
* ``taylor``: ``min Σ_{i∈S} log(1 + exp(-(f_i + x_iᵀw))) + ‖w‖²/(2C)`` with per-sample offsets
  ``o_i = f_i(θ*)``: the logistic fit of the linearised model itself (same minimiser as the form
  above, which is this objective times C).

The solver
----------
A fit per subset with a k×k Newton system per subset costs S·N·k² per iteration, which is why a
batched Newton is barely faster than a loop of liblinear fits. Here every iteration is a few
matmuls shared by all subsets of a chunk, with the masks applied elementwise:

1. Rotate once. With ``Q`` the eigenvectors of the Gram matrix ``AᵀA`` of all samples (``A`` the
   N×k' matrix of rows ``a_i``), solve for ``v' = Qᵀv`` with features ``B = AQ``. ``½‖v‖²`` is
   rotation invariant, and in this basis the dominant directions of projected gradients (their
   common mean direction above all) are coordinate axes. ``precondition="diag"`` skips the
   rotation (``Q = I``; chosen by ``"auto"`` when k' > 2048, where an eigendecomposition costs
   more than it saves).
2. Preconditioned nonlinear conjugate gradients (Polak–Ribière+, restarted when not a descent
   direction). The preconditioner is the diagonal of the Hessian in that basis,
   ``1 + C Σ_i m_i σ_i(1-σ_i) B_i²`` (one S×N × N×k' matmul), refreshed every iteration.
3. Line search in the margins: with ``z = o + Bv'`` (S×N) and ``u = Bd`` for the direction ``d``,
   ``φ(α) = f(v' + αd)`` and its first two derivatives are elementwise reductions over ``z + αu``,
   so the line search needs no matmul: a Newton step from 0 (with the curvatures kept from the
   gradient pass), then two evaluations of φ', φ'' that bracket the minimiser, ending on a point
   known to descend or inside the bracket. The margins are updated as ``z ← z + αu``
   (recomputed exactly every 25 iterations).

One iteration costs three S×N×k' matmuls (``u``, the gradient, the preconditioner) and a few
elementwise passes over S×N; boolean masks stay boolean on the device. Since σ(1-σ) ≤ ¼ and
m ≤ 1, every diagonal entry lies in ``[1, 1 + C·¼·Σ_i B_i²]`` whatever the subset: when that
bound is within ``_IDENTITY_TOL`` of 1 (strong regularisation, the paper's C = 1e-4), "auto"
drops the preconditioner (``precondition="none"``: plain nonlinear CG, two matmuls an
iteration, and no eigendecomposition), which changes the path, not the solution. At C = 1e-4 and
realistic gradient scales the Hessian is close to the identity and about 3 iterations suffice;
C·‖x‖² ~ 1e4 takes tens. The loop is a ``lax.while_loop`` over the chunk that runs until every
subset has stopped or ``max_iter``; a stopped subset is frozen. Chunks are padded to one shape
(one compilation per N, k', chunk size).

Stopping rule. The objective is 1-strongly convex (the ``½‖v‖²`` term), so ``‖v - v*‖ ≤
‖∇f(v)‖`` for any v. A subset stops, ``converged``, when ``‖∇f(v)‖₂ ≤ tol·‖v‖₂``: this certifies
a relative error ``‖v - v*‖/‖v*‖ ≤ tol/(1 - tol)`` on the whole coefficient vector, at any scale
of x and C. liblinear's primal solver stops at ``‖∇f(v)‖₂ ≤ ε·‖∇f(0)‖₂`` with ``ε = 1e-4 ·
max(min(#pos, #neg), 1)/n`` (``tol=1e-4`` in scikit-learn); since ``‖v*‖ ≤ ‖∇f(0)‖`` (strong
convexity again), the default ``tol=1e-5`` here is at least as tight whenever the minority class
holds ≥ 10% of the subset (always so for gradex's 70/30 labels on more than a handful of
samples), and much tighter when C·‖x‖² is large, where ``‖v*‖ ≪ ‖∇f(0)‖``. A subset whose
gradient norm has not improved by 0.1% in 30 iterations stops as well, with ``converged=False``
(the float32 floor on an ill-conditioned problem; run under ``jax.enable_x64(True)`` with float64
features to go further). ``grad_norm`` reports the final ``‖∇f(v)‖₂`` (in the ``½‖v‖² + C·Σ``
form), an upper bound of ``‖v - v*‖``.

Empty subsets return ``w = 0, b = 0, converged = True, n_iter = 0`` (the exact minimiser of
``½‖v‖²``), without NaNs. One-sample subsets are ordinary problems.

Lifting ``w_S`` to a parameter update and estimating the target metrics of ``θ* + Δ_S``:
:mod:`jaxgrad.estimate.lift`. The solver itself: :mod:`jaxgrad.estimate.solver`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrad.common.checks import matmul_highest, positive_float, positive_int
from jaxgrad.common.sharding import from_host
from jaxgrad.config import OBJECTIVES
from jaxgrad.estimate.arrays import (CHUNK_ELEMENTS, check_feats, check_labels, check_masks,
                                     check_vector, gather_from_mesh, subset_sharding)
from jaxgrad.estimate.solver import SubsetFits, gram_eigenbasis, init_vector, solve_chunk

PRECONDITIONERS = ("auto", "eig", "diag", "none")
# Probability of label 1 in the gradex objective (the seed's Bernoulli(0.7)).
GRADEX_POSITIVE_RATE = 0.7

_MAX_EIG_DIM = 2048  # "auto" rotates to the Gram eigenbasis up to this many columns
_IDENTITY_TOL = 0.05  # "auto": no preconditioner when C·¼·max_j Σ_i x_ij² is below this


def gradex_labels(n: int, seed: int = 0, p: float = GRADEX_POSITIVE_RATE) -> jax.Array:
    """The gradex labels: n draws of Bernoulli(p) from ``jax.random.key(seed)``, int32 in {0, 1}.

    Drawn once for all samples, so a sample has the same label in every subset, and the same
    labels for the same (n, seed, p) on every run and platform. The paper's ``y_i ~
    Bernoulli(0.7)`` of the ``gradex`` objective (module docstring).

    Args:
      n: the number of samples N (a non-negative int).
      seed: the seed of ``jax.random.key``.
      p: P(y = 1), in [0, 1] (default ``GRADEX_POSITIVE_RATE`` = 0.7).

    Returns:
      [N] int32 labels in {0, 1}.

    Raises:
      ValueError: ``n`` not a non-negative int, or ``p`` outside [0, 1].
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    return jax.random.bernoulli(jax.random.key(seed), p, (int(n),)).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------


def fit_subsets(
    feats_NxK: jax.typing.ArrayLike,
    masks_SxN: jax.typing.ArrayLike,
    *,
    objective: str = "gradex",
    C: float = 1e-4,
    seed: int = 0,
    labels: jax.typing.ArrayLike | None = None,
    offsets: jax.typing.ArrayLike | None = None,
    fit_intercept: bool | None = None,
    intercept_scaling: float = 1.0,
    tol: float = 1e-5,
    max_iter: int = 300,
    chunk_size: int | None = None,
    precondition: str = "auto",
    init: SubsetFits | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> SubsetFits:
    """Fits one L2-regularised logistic regression per subset of samples, batched.

    Args:
      feats_NxK: projected per-sample gradients x_i, N×k, finite. float64 features are fitted
        in float64 when jax x64 is enabled, otherwise in float32.
      masks_SxN: one row per subset over the N samples: booleans, or non-negative weights
        (``m_i`` multiplies sample i's loss, as scikit-learn's ``sample_weight``).
      objective: ``"gradex"``, ``"one_class"`` or ``"taylor"`` (see the module docstring).
      C: inverse regularisation strength, > 0 (scikit-learn's C).
      seed: seed of the gradex labels (``gradex_labels(N, seed)``), used if ``labels`` is None.
      labels: gradex labels in {0, 1}, length N (overrides ``seed``).
      offsets: taylor offsets f_i(θ*), length N (required for, and only for, ``taylor``).
      fit_intercept: fit a penalised intercept. Default: True for gradex, False otherwise.
      intercept_scaling: liblinear's constant feature value (the intercept is penalised as
        ``(b/intercept_scaling)²/2``).
      tol: stopping tolerance, ``‖∇f(v)‖₂ ≤ tol·‖v‖₂`` (relative error of v at most
        ``tol/(1 - tol)``), > 0.
      max_iter: iteration cap per chunk (a subset that hits it has ``converged=False``).
      chunk_size: subsets per jitted call; memory is about 8·chunk_size·N floats. Default: a
        chunk of about 8M mask entries.
      precondition: ``"auto"``, ``"eig"`` (rotate to the eigenbasis of the Gram matrix of all
        samples; costs one eigendecomposition of size k'), ``"diag"`` (no rotation) or
        ``"none"``. "auto": "none" when the diagonal preconditioner is within 5% of the
        identity for every subset, else "eig" up to k' = 2048 columns, else "diag".
      init: warm start, e.g. the fits of parent subsets (same S, k and intercept setting).
      mesh: shard each chunk's subsets over this mesh's ``data`` axis (the features are
        replicated; every device solves its own subsets, and the iteration stops when every
        device's subsets have converged). With several processes the mesh spans them all and
        every process passes the same masks and gets every subset's fit back. Each subset's
        fit is the one-device fit up to float32 rounding (the matmuls of a smaller chunk may
        sum in another order): ``tests/estimate/test_surrogate.py`` on 8 fake devices.

    Returns:
      ``SubsetFits`` with S×k ``coef`` and S-vectors ``intercept``, ``converged``, ``n_iter``
      and ``grad_norm``.

    Raises:
      ValueError, TypeError: on malformed input, named by argument.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if precondition not in PRECONDITIONERS:
        raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
    C, tol = positive_float("C", C), positive_float("tol", tol)
    intercept_scaling = positive_float("intercept_scaling", intercept_scaling)
    max_iter = positive_int("max_iter", max_iter)
    # 1. The design: a row a_i and an offset o_i per sample, a weight row per subset.
    design = _subset_design(feats_NxK, masks_SxN, objective, seed=seed, labels=labels,
                            offsets=offsets, fit_intercept=fit_intercept,
                            intercept_scaling=intercept_scaling)
    # 2. The batched logistic solve, in the basis of the preconditioner (b_i = Qᵀa_i).
    precondition = _preconditioner(precondition, design.a_NxKp, C)
    q_KxK = gram_eigenbasis(design.a_NxKp) if precondition == "eig" else None
    b_NxK = design.a_NxKp if q_KxK is None else matmul_highest(design.a_NxKp, q_KxK)
    v0 = None if init is None else _warm_start(init, design, q_KxK)
    v, converged, n_iter, grad_norm = _solve_in_chunks(
        b_NxK, design.o_N, design.masks_SxN, v0, C, tol, max_iter=max_iter,
        chunk_size=chunk_size, mesh=mesh, diag=precondition != "none")
    # 3. Back to the coefficients w and intercept b of each subset, with its status.
    if q_KxK is not None:
        v = matmul_highest(v, q_KxK.T)
    return _subset_fits(design, v, converged, n_iter, grad_norm)


class _Design(NamedTuple):
    """The logistic problems of all subsets: ``½‖v‖² + C Σ_i m_si softplus(-(o_i + a_iᵀv))``."""

    a_NxKp: jax.Array  # the rows a_i: x_i, then the intercept feature when fit_intercept
    o_N: jax.Array  # the offsets o_i (zeros but for taylor)
    masks_SxN: np.ndarray  # the weights m_si, on the host (booleans, or non-negative numbers)
    k: int  # columns of x_i; a_NxKp has k + 1 with an intercept
    fit_intercept: bool
    intercept_scaling: float


def _subset_design(feats_NxK, masks_SxN, objective: str, *, seed, labels, offsets,
                   fit_intercept: bool | None, intercept_scaling: float) -> _Design:
    """Checks the data of ``fit_subsets`` and builds the rows ``a_i`` and offsets ``o_i`` of the
    objective (module docstring, "The three objectives")."""
    x_NxK = check_feats("feats_NxK", feats_NxK)
    n, k = x_NxK.shape
    masks = check_masks(masks_SxN, n)
    dtype = x_NxK.dtype
    if fit_intercept is None:
        fit_intercept = objective == "gradex"

    if labels is not None and objective != "gradex":
        raise ValueError(f"labels are only used by objective='gradex', not {objective!r}")
    if offsets is not None and objective != "taylor":
        raise ValueError(f"offsets are only used by objective='taylor', not {objective!r}")
    o_N = jnp.zeros((n,), dtype)
    if objective == "taylor":
        if offsets is None:
            raise ValueError("objective='taylor' needs offsets (f_i(θ*), one per sample)")
        o_N = check_vector("offsets", offsets, n, dtype)
    columns = [x_NxK]
    if fit_intercept:
        if objective == "gradex":
            y = gradex_labels(n, seed) if labels is None else check_labels(labels, n)
            t_N = (2 * y - 1).astype(dtype)
        else:
            t_N = jnp.ones((n,), dtype)
        columns.append((t_N * intercept_scaling)[:, None])
    a_NxKp = jnp.concatenate(columns, axis=1) if len(columns) > 1 else x_NxK
    return _Design(a_NxKp, o_N, masks, k, fit_intercept, intercept_scaling)


def _preconditioner(precondition: str, a_NxKp: jax.Array, C: float) -> str:
    """``precondition``, with "auto" resolved to "none", "eig" or "diag"."""
    if precondition != "auto":
        return precondition
    # Diagonal Hessian entries lie in [1, 1 + C·¼·Σ_i a_ij²] for any subset.
    bound = float(C * 0.25 * jnp.max(jnp.sum(jnp.square(a_NxKp), axis=0)))
    if bound <= _IDENTITY_TOL:
        return "none"
    return "eig" if a_NxKp.shape[1] <= _MAX_EIG_DIM else "diag"


def _warm_start(init: SubsetFits, design: _Design, q_KxK: jax.Array | None) -> jax.Array:
    """``init`` as starting vectors v (S×k'), in the solver's basis."""
    v0 = init_vector(init, design.masks_SxN.shape[0], design.k, design.fit_intercept,
                     design.intercept_scaling, design.a_NxKp.dtype)
    return v0 if q_KxK is None else matmul_highest(v0, q_KxK)


def _chunk_rows(n_subsets: int, n: int, chunk_size: int | None, ways: int) -> int:
    """Subsets per jitted call: equal chunks, a multiple of ``ways`` (the devices)."""
    if chunk_size is None:
        chunk_size = max(8, CHUNK_ELEMENTS // max(n, 1) // 8 * 8)
    chunk_size = positive_int("chunk_size", chunk_size)
    # Equal chunks (the last one padded with empty subsets, which still cost their matmuls):
    # 2000 subsets in chunks of at most 1904 are two chunks of 1000, not 1904 + 96 padded to 1904.
    n_chunks = max(1, -(-n_subsets // chunk_size))
    chunk = min(chunk_size, max(-(-n_subsets // n_chunks), 1))
    return -(-chunk // ways) * ways  # every device gets the same number of subsets


def _solve_in_chunks(b_NxK, o_N, masks, v0, C, tol, *, max_iter, chunk_size, mesh, diag):
    """:func:`solve_chunk` over the subsets, chunk by chunk (each padded to one shape, so one
    compilation), sharded over ``mesh``; returns (v S×k', converged, n_iter, grad_norm)."""
    n_subsets, (n, kp), dtype = masks.shape[0], b_NxK.shape, b_NxK.dtype
    shard = subset_sharding(mesh)
    chunk = _chunk_rows(n_subsets, n, chunk_size, 1 if shard is None else mesh.shape["data"])
    c_arr, tol_arr = jnp.asarray(C, dtype), jnp.asarray(tol, dtype)
    if shard is not None:
        replicated = jax.sharding.NamedSharding(shard.mesh, jax.sharding.PartitionSpec())
        b_NxK, o_N, c_arr, tol_arr = (from_host(x, replicated) for x in (b_NxK, o_N, c_arr, tol_arr))
    # Boolean masks stay boolean on the device (a quarter of the memory traffic of floats).
    mask_dtype = bool if masks.dtype == bool else dtype
    outs = []
    for start in range(0, n_subsets, chunk):
        m_CxN = jnp.asarray(masks[start:start + chunk], mask_dtype)
        rows = m_CxN.shape[0]
        v_CxK = (jnp.zeros((rows, kp), dtype) if v0 is None else v0[start:start + chunk])
        if rows < chunk:  # pad the last chunk with empty subsets: one compiled shape
            m_CxN = jnp.pad(m_CxN, ((0, chunk - rows), (0, 0)))  # False / 0
            v_CxK = jnp.pad(v_CxK, ((0, chunk - rows), (0, 0)))
        if shard is not None:
            m_CxN, v_CxK = from_host(m_CxN, shard), from_host(v_CxK, shard)
        out = solve_chunk(b_NxK, o_N, m_CxN, v_CxK, c_arr, tol_arr, max_iter=max_iter,
                          warm=v0 is not None, diag=diag)
        if shard is not None:
            out = gather_from_mesh(out)
        outs.append(jax.tree_util.tree_map(lambda x, rows=rows: x[:rows], out))
    if outs:
        return tuple(jnp.concatenate(p) for p in zip(*outs, strict=True))
    return (jnp.zeros((0, kp), dtype), jnp.zeros((0,), bool), jnp.zeros((0,), jnp.int32),
            jnp.zeros((0,), dtype))


def _subset_fits(design: _Design, v_SxKp, converged, n_iter, grad_norm) -> SubsetFits:
    """The fits from the solutions v = [w, b/intercept_scaling] and the solver's status."""
    k, n_subsets = design.k, design.masks_SxN.shape[0]
    if design.fit_intercept:
        intercept = v_SxKp[:, k] * design.intercept_scaling
    else:
        intercept = jnp.zeros((n_subsets,), design.a_NxKp.dtype)
    return SubsetFits(v_SxKp[:, :k], intercept, converged, n_iter, grad_norm)
