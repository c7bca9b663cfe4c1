"""Batched logistic surrogates over subsets of samples, lifted updates and their estimates.

GradEx (DESIGN.md steps 3–4) fits, for every subset S of data sources, an L2-regularised
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

Lift, rescale and estimate
--------------------------
``rescale_factors`` computes ``‖P w‖ = √(wᵀ(PᵀP)w)`` exactly from ``projector.gram()`` and
``c = scale·‖θ*‖/‖P w‖`` (0 for w = 0). ``lift_updates`` returns ``c·P w`` (S×D).
``estimate_subsets`` is the linearised estimate ``f̂_j = f_j(θ*) + c·x_jᵀw`` for every target
sample j (``⟨Pᵀg_j, w⟩ = ⟨g_j, P w⟩``), reduced to per-subset metrics in one jitted call.
``exact_estimates`` writes ``θ* + Δ_S`` into a parameter tree and evaluates any
``loss_fn(params)``, vmapped over a chunk of subsets.

Example::

    fits = fit_subsets(feats_NxK, masks_SxN, C=1e-4, seed=0)
    c_S = rescale_factors(fits.coef, projector, theta_norm, scale=0.1)
    est = estimate_subsets(fits, c_S, target_feats_JxK, target_f_J)
    est["loss"]      # S, mean target logistic loss of θ* + Δ_S (lower is better)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

from jaxgrad.common import flat
from jaxgrad.common.sharding import from_host
from jaxgrad.gradients.outputs import outputs_loss

OBJECTIVES = ("gradex", "one_class", "taylor")
OUTPUTS = ("logit_odds", "token_ce")
PRECONDITIONERS = ("auto", "eig", "diag", "none")
# Probability of label 1 in the gradex objective (the seed's Bernoulli(0.7)).
GRADEX_POSITIVE_RATE = 0.7
# Whether a larger value of each metric returned by estimate_subsets is better.
HIGHER_IS_BETTER = {"loss": False, "accuracy": True, "mean_output": True}

_HIGHEST = lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators: fits need float32
_MAX_EIG_DIM = 2048  # "auto" rotates to the Gram eigenbasis up to this many columns
_IDENTITY_TOL = 0.05  # "auto": no preconditioner when C·¼·max_j Σ_i x_ij² is below this
_LINE_SEARCH_STEPS = 2
_STALL_ITERS = 30  # stop a subset whose gradient norm has not improved by 0.1% for this long
_STALL_GAIN = 1e-3
_RECOMPUTE_MARGINS_EVERY = 25
_CHUNK_ELEMENTS = 2**23  # default chunk: S_chunk·N about 8M (32 MB per float32 S×N array)


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


def gradex_labels(n: int, seed: int = 0, p: float = GRADEX_POSITIVE_RATE) -> jax.Array:
    """The gradex labels: n draws of Bernoulli(p) from ``jax.random.key(seed)``, int32 in {0, 1}.

    Drawn once for all samples, so a sample has the same label in every subset, and the same
    labels for the same (n, seed, p) on every run and platform.
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
        sum in another order): ``tests/test_surrogate.py`` on 8 fake devices.

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
    C = _positive_float("C", C)
    tol = _positive_float("tol", tol)
    intercept_scaling = _positive_float("intercept_scaling", intercept_scaling)
    max_iter = _positive_int("max_iter", max_iter)
    x_NxK = _check_feats("feats_NxK", feats_NxK)
    n, k = x_NxK.shape
    masks = _check_masks(masks_SxN, n)
    n_subsets = masks.shape[0]
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
        o_N = _check_vector("offsets", offsets, n, dtype)
    columns = [x_NxK]
    if fit_intercept:
        if objective == "gradex":
            y = gradex_labels(n, seed) if labels is None else _check_labels(labels, n)
            t_N = (2 * y - 1).astype(dtype)
        else:
            t_N = jnp.ones((n,), dtype)
        columns.append((t_N * intercept_scaling)[:, None])
    a_NxKp = jnp.concatenate(columns, axis=1) if len(columns) > 1 else x_NxK
    kp = a_NxKp.shape[1]

    if precondition == "auto":
        # Diagonal Hessian entries lie in [1, 1 + C·¼·Σ_i a_ij²] for any subset.
        bound = float(C * 0.25 * jnp.max(jnp.sum(jnp.square(a_NxKp), axis=0)))
        if bound <= _IDENTITY_TOL:
            precondition = "none"
        else:
            precondition = "eig" if kp <= _MAX_EIG_DIM else "diag"
    q_KxK = _gram_eigenbasis(a_NxKp) if precondition == "eig" else None
    b_NxK = a_NxKp if q_KxK is None else _mm(a_NxKp, q_KxK)

    v0 = None
    if init is not None:
        v0 = _init_vector(init, n_subsets, k, fit_intercept, intercept_scaling, dtype)
        if q_KxK is not None:
            v0 = _mm(v0, q_KxK)

    if chunk_size is None:
        chunk_size = max(8, _CHUNK_ELEMENTS // max(n, 1) // 8 * 8)
    chunk_size = _positive_int("chunk_size", chunk_size)
    # Equal chunks (the last one padded with empty subsets, which still cost their matmuls):
    # 2000 subsets in chunks of at most 1904 are two chunks of 1000, not 1904 + 96 padded to 1904.
    n_chunks = max(1, -(-n_subsets // chunk_size))
    chunk = min(chunk_size, max(-(-n_subsets // n_chunks), 1))
    shard = _subset_sharding(mesh)
    c_arr, tol_arr = jnp.asarray(C, dtype), jnp.asarray(tol, dtype)
    if shard is not None:  # every device gets the same number of subsets
        ways = mesh.shape["data"]
        chunk = -(-chunk // ways) * ways
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
        out = _solve_chunk(b_NxK, o_N, m_CxN, v_CxK, c_arr, tol_arr, max_iter=max_iter,
                           warm=v0 is not None, diag=precondition != "none")
        if shard is not None:
            out = _from_mesh(out)
        outs.append(jax.tree_util.tree_map(lambda x, rows=rows: x[:rows], out))
    if outs:
        v, converged, n_iter, grad_norm = (jnp.concatenate(p) for p in zip(*outs, strict=True))
    else:
        v = jnp.zeros((0, kp), dtype)
        converged, n_iter = jnp.zeros((0,), bool), jnp.zeros((0,), jnp.int32)
        grad_norm = jnp.zeros((0,), dtype)
    if q_KxK is not None:
        v = _mm(v, q_KxK.T)
    intercept = v[:, k] * intercept_scaling if fit_intercept else jnp.zeros((n_subsets,), dtype)
    return SubsetFits(v[:, :k], intercept, converged, n_iter, grad_norm)


def _subset_sharding(mesh):
    """Rows (subsets) over the mesh's ``data`` axis; None without a mesh or with one device."""
    if mesh is None or mesh.shape.get("data", 1) * mesh.shape.get("model", 1) <= 1:
        return None
    if mesh.shape.get("model", 1) > 1:
        raise ValueError(f"fit_subsets: mesh {dict(mesh.shape)}: subsets shard over 'data' only; "
                         "give a mesh whose 'model' axis has size 1")
    # Auto axes: the solver's while_loop carries unannotated arrays (an Explicit-axes mesh, the
    # default of jax.make_mesh, would type them as sharded and refuse the loop).
    auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    return jax.sharding.NamedSharding(auto, jax.sharding.PartitionSpec("data", None))


def _from_mesh(tree):
    """Every entry of a sharded result on this process (gathered from the other processes)."""
    if jax.process_count() > 1:
        return jax.tree_util.tree_map(
            lambda x: jnp.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, jax.devices()[0]), tree)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


@jax.jit
def _gram_eigenbasis(a_NxK: jax.Array) -> jax.Array:
    """Eigenvectors (k'×k', orthogonal) of AᵀA."""
    gram = jnp.matmul(a_NxK.T, a_NxK, precision=_HIGHEST)
    _, q = jnp.linalg.eigh(gram)
    return q


@functools.partial(jax.jit, static_argnames=("max_iter", "warm", "diag"))
def _solve_chunk(b_NxK, o_N, m_SxN, v_SxK, C, tol, *, max_iter, warm, diag=True):
    """Preconditioned nonlinear CG for ``½‖v‖² + C Σ_i m_si softplus(-(o_i + b_iᵀv_s))``.

    ``warm`` is False when v_SxK is all zeros (the margins are then just the offsets).
    ``diag``: the diagonal preconditioner; False: none (plain nonlinear CG, one matmul less).
    Returns (v S×k', converged S, n_iter S, grad_norm S).
    """
    eps = jnp.finfo(b_NxK.dtype).eps
    weigh = _weigher(m_SxN)

    def margins(v):
        return o_N[None, :] + _mm(v, b_NxK.T)

    def gradient(v, z):
        """∇f, the inverse diagonal preconditioner and the weighted curvatures m·σ(1-σ)."""
        s = jax.nn.sigmoid(-z)  # -dℓ/dz of ℓ(z) = softplus(-z)
        ms = weigh(s)
        g = v - C * _mm(ms, b_NxK)
        curv_SxN = ms - ms * s  # m·σ(1-σ), written without a broadcast constant 1
        if not diag:
            return g, jnp.ones((), g.dtype), curv_SxN
        pinv = 1.0 / (1.0 + C * _mm(curv_SxN, jnp.square(b_NxK)))
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
        u = _mm(d, b_NxK.T)
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


def _init_vector(init, n_subsets, k, fit_intercept, intercept_scaling, dtype):
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


# ----------------------------------------------------------------------------------------------
# Lift and rescale
# ----------------------------------------------------------------------------------------------


def rescale_factors(coef_SxK: jax.typing.ArrayLike, projector: Any,
                    theta_norm: jax.typing.ArrayLike | None, *, scale: float | None) -> jax.Array:
    """Factors c_S with ‖c_S · P w_S‖ = scale · ‖θ*‖ (or c = 1 when ``scale`` is None).

    ‖P w‖ is exact: √(wᵀ(PᵀP)w) with PᵀP from ``projector.gram()``.

    Args:
      coef_SxK: S×k surrogate coefficients (``SubsetFits.coef``).
      projector: a ``jaxgrad.gradients.projection.Projector`` (anything with ``gram()`` and
        ``k``), or its k×k Gram matrix PᵀP already computed (``gram()`` costs D·k² flops: cache
        it).
      theta_norm: ‖θ*‖ of the trainable (LoRA) parameters, > 0 (``jaxgrad.common.flat.tree_norm``);
        ignored when ``scale`` is None.
      scale: ‖Δ‖/‖θ*‖ (the paper uses 0.02…0.4), or None for unscaled updates (c = 1).

    Returns:
      S factors; 0 where w = 0 (an empty subset), so that its Δ is 0.
    """
    w = _check_coef(coef_SxK)
    if scale is None:
        return jnp.ones((w.shape[0],), w.dtype)
    scale = _positive_float("scale", scale)
    theta_norm = _positive_float("theta_norm", theta_norm)
    gram = _projector_gram(projector, w.shape[1])
    return _rescale(w, gram.astype(w.dtype), jnp.asarray(scale * theta_norm, w.dtype))


@jax.jit
def _rescale(w_SxK, gram_KxK, target):
    sq = jnp.einsum("sk,kl,sl->s", w_SxK, gram_KxK, w_SxK, precision=_HIGHEST)
    norm = jnp.sqrt(jnp.maximum(sq, 0.0))
    return jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 0.0)


def lift_updates(coef_SxK: jax.typing.ArrayLike, c_S: jax.typing.ArrayLike,
                 projector: Any) -> jax.Array:
    """The estimated updates Δ_S = c_S · P w_S, S×D (float32), via ``projector.lift``."""
    w = _check_coef(coef_SxK)
    c = _check_factors(c_S, w.shape[0], w.dtype)
    if w.shape[1] != projector.k:
        raise ValueError(f"coef_SxK has k = {w.shape[1]} columns but the projector has "
                         f"k = {projector.k}")
    return projector.lift(w * c[:, None])


# ----------------------------------------------------------------------------------------------
# Estimates
# ----------------------------------------------------------------------------------------------


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

    Returns:
      A dict of S-vectors (``HIGHER_IS_BETTER`` gives each metric's direction):

      * ``logit_odds``: ``loss`` = mean_j log(1 + exp(-f̂_sj)) (lower is better),
        ``accuracy`` = mean_j [f̂_sj > 0] (higher is better; the gold token holds more than half
        the probability), ``mean_output`` = mean_j f̂_sj (higher is better).
      * ``token_ce``: ``loss`` = mean_j f̂_sj, the linearised cross-entropy (lower is better).
        The surrogate must then have been fitted so that Δ lowers the loss (on gradients of
        -CE), otherwise Δ points uphill.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    coef = fits_or_coef.coef if isinstance(fits_or_coef, SubsetFits) else fits_or_coef
    w = _check_coef(coef)
    x_JxK = _check_feats("target_feats_JxK", target_feats_JxK)
    if x_JxK.shape[1] != w.shape[1]:
        raise ValueError(f"target_feats_JxK has k = {x_JxK.shape[1]} columns but the "
                         f"coefficients have k = {w.shape[1]}")
    dtype = jnp.promote_types(w.dtype, x_JxK.dtype)
    f_J = _check_vector("target_f_J", target_f_J, x_JxK.shape[0], dtype)
    c = _check_factors(c_S, w.shape[0], dtype)
    n_subsets, n_target = w.shape[0], x_JxK.shape[0]
    if chunk_size is None:
        chunk_size = max(8, _CHUNK_ELEMENTS // max(n_target, 1))
    chunk_size = _positive_int("chunk_size", chunk_size)
    parts = [_linearized(w[i:i + chunk_size].astype(dtype), c[i:i + chunk_size],
                         x_JxK.astype(dtype), f_J, output=output)
             for i in range(0, n_subsets, chunk_size)]
    if not parts:
        names = ("loss", "accuracy", "mean_output") if output == "logit_odds" else ("loss",)
        return {name: jnp.zeros((0,), dtype) for name in names}
    return {name: jnp.concatenate([p[name] for p in parts]) for name in parts[0]}


@functools.partial(jax.jit, static_argnames=("output",))
def _linearized(w_SxK, c_S, x_JxK, f_J, *, output):
    f_SxJ = f_J[None, :] + c_S[:, None] * jnp.matmul(w_SxK, x_JxK.T, precision=_HIGHEST)
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

    ``mesh``: shard each chunk's subsets over the mesh's ``data`` axis (θ* replicated; the
    chunk is rounded up to a multiple of the axis), as :func:`fit_subsets` does.

    Returns:
      ``loss_fn``'s output with a leading axis of S.
    """
    w = _check_coef(coef_SxK)
    c = _check_factors(c_S, w.shape[0], w.dtype)
    chunk_size = _positive_int("chunk_size", chunk_size)
    spec = flat.flat_spec(theta_star)
    if spec.size != projector.dim:
        raise ValueError(f"theta_star has D = {spec.size} parameters but the projector has "
                         f"dim = {projector.dim}")
    n_subsets = w.shape[0]
    if n_subsets == 0:
        raise ValueError("exact_estimates needs at least one subset (coef_SxK has S = 0)")
    evaluate = _vmapped_loss(loss_fn, spec)
    chunk = min(chunk_size, n_subsets)
    shard = _subset_sharding(mesh)
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
            out = _from_mesh(evaluate(theta_star, from_host(delta, shard)))
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


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _float_dtype(x: np.ndarray | jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 8:
        return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return jnp.float32


def _check_feats(name: str, feats: Any) -> jax.Array:
    arr = np.asarray(feats) if not isinstance(feats, jax.Array) else feats
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows × k), got shape {tuple(arr.shape)}")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    x = jnp.asarray(arr, _float_dtype(arr))
    bad_rows = ~jnp.all(jnp.isfinite(x), axis=1)
    n_bad = int(jnp.sum(bad_rows))
    if n_bad:
        first = int(jnp.argmax(bad_rows))
        raise ValueError(f"{name} has NaN or inf in {n_bad} of {x.shape[0]} rows (first: row "
                         f"{first}); drop or recompute those samples before fitting")
    return x


def _check_masks(masks: Any, n: int) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim != 2:
        raise ValueError(f"masks_SxN must be 2-D (subsets × samples), got shape {m.shape}")
    if m.shape[1] != n:
        raise ValueError(f"masks_SxN has shape {m.shape}: its {m.shape[1]} columns must match "
                         f"the N = {n} rows of feats_NxK")
    if m.dtype == bool:
        return m
    if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
        raise TypeError(f"masks_SxN must be boolean or numeric weights, got dtype {m.dtype}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("masks_SxN weights must be finite and non-negative")
    return m


def _check_labels(labels: Any, n: int) -> jax.Array:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape (N,) = ({n},), got {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"labels must be 0 or 1, got values {np.unique(y)[:5]}")
    return jnp.asarray(y.astype(np.int32))


def _check_vector(name: str, values: Any, n: int, dtype: Any) -> jax.Array:
    arr = np.asarray(values) if not isinstance(values, jax.Array) else values
    if tuple(arr.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(arr.shape)}")
    x = jnp.asarray(arr, dtype)
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} has NaN or inf entries")
    return x


def _check_coef(coef: Any) -> jax.Array:
    arr = np.asarray(coef) if not isinstance(coef, jax.Array) else coef
    if arr.ndim != 2:
        raise ValueError(f"coef_SxK must be 2-D (subsets × k), got shape {tuple(arr.shape)}")
    return jnp.asarray(arr, _float_dtype(arr))


def _check_factors(c: Any, n_subsets: int, dtype: Any) -> jax.Array:
    arr = jnp.asarray(c, dtype)
    if arr.ndim == 0:
        arr = jnp.full((n_subsets,), arr)
    if arr.shape != (n_subsets,):
        raise ValueError(f"c_S must be a scalar or have shape (S,) = ({n_subsets},), "
                         f"got {arr.shape}")
    if not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError("c_S has NaN or inf entries")
    return arr


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


def _positive_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return out


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)
