"""jaxgrad.gradients.projection (with its XLA path, jaxgrad.gradients.xla): the counter-based
projector against dense references and its own spec. The entries themselves are
tests/gradients/test_prng.py's, the Pallas kernels tests/gradients/test_pallas.py's.

The references are independent of the code under test: float64 numpy products with the
materialised matrix, and statistical bounds derived in the comments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from jaxgrad.gradients.projection import Projector


def _rng(seed=0):
    return np.random.default_rng(seed)


def _int_valued(shape, seed=0):
    """Small integers as float32: with ±1 entries every partial sum is an exact integer, so any
    blocking or summation order gives bit-identical results."""
    return _rng(seed).integers(-8, 9, shape).astype(np.float32)


# (dim, k, block_d, block_k, offset, width): ragged row blocks, several column tiles (k not a
# multiple of block_k), width below one block, offsets != 0, a leaf ending exactly at dim.
_CASES = [
    (777, 40, 64, 16, 123, 300),
    (1000, 33, 128, 2048, 0, 1000),
    (513, 130, 1000, 64, 500, 13),
    (300, 7, 7, 3, 1, 299),
]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dim,k,block_d,block_k,offset,width", _CASES)
def test_project_and_lift_match_dense(kind, dim, k, block_d, block_k, offset, width):
    proj = Projector(seed=3, dim=dim, k=k, kind=kind, block_d=block_d, block_k=block_k)
    p_DxK = np.asarray(proj.dense(), np.float64)
    rows = p_DxK[offset:offset + width]
    g = _rng(1).standard_normal((3, width)).astype(np.float32)
    ref = g.astype(np.float64) @ rows
    got = np.asarray(proj.project(g, offset=offset))
    assert got.shape == (3, k) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                               err_msg="project(g, offset) != g @ dense()[offset:offset+D_g]")
    np.testing.assert_allclose(np.asarray(proj.project(g[1], offset=offset)), ref[1], rtol=0,
                               atol=1e-5 * np.abs(ref).max(),
                               err_msg="1-D g should be projected like one row")

    w = _rng(2).standard_normal((2, k)).astype(np.float32)
    lifted = np.asarray(proj.lift(w, offset=offset, length=width))
    ref_l = w.astype(np.float64) @ rows.T
    assert lifted.shape == (2, width)
    np.testing.assert_allclose(lifted, ref_l, rtol=0, atol=1e-5 * np.abs(ref_l).max(),
                               err_msg="lift(w, offset, length) != dense()[rows] @ w")
    np.testing.assert_allclose(np.asarray(proj.lift(w[0])), p_DxK @ w[0], rtol=0,
                               atol=1e-5 * np.abs(p_DxK @ w[0]).max(),
                               err_msg="lift of a k-vector over all of P != dense() @ w")

    # Adjointness: <Pᵀg, w> = <g, P w>.
    lhs = np.sum(got.astype(np.float64) * w[:1].repeat(3, 0))
    rhs = np.sum(g.astype(np.float64) * np.asarray(proj.lift(w[0], offset, width), np.float64))
    assert abs(lhs - rhs) <= 1e-5 * (abs(lhs) + 1), f"<Pᵀg, w> = {lhs} but <g, Pw> = {rhs}"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_gram_equals_dense_product(kind):
    proj = Projector(seed=11, dim=1500, k=48, kind=kind, block_d=256)
    p_DxK = np.asarray(proj.dense(), np.float64)
    gram = np.asarray(proj.gram(), np.float64)
    np.testing.assert_allclose(gram, p_DxK.T @ p_DxK, rtol=0, atol=1e-4 * proj.dim / proj.k,
                               err_msg="gram() != dense().T @ dense()")
    w = _rng(3).standard_normal(48)
    norm2 = np.sum(np.asarray(proj.lift(w.astype(np.float32)), np.float64) ** 2)
    assert abs(norm2 - w @ gram @ w) <= 1e-4 * norm2, "‖P w‖² != wᵀ gram w"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_independent_of_block_sizes_and_offset_splitting(kind):
    # k = 64: the scale 1/√k = 1/8 is a power of two, so scaling pieces before summing them is
    # exact too and the Rademacher checks can demand bit-identical results.
    dim, k = 2000, 64
    g = _int_valued((4, 1900), seed=4)
    base = Projector(seed=21, dim=dim, k=k, kind=kind)
    ref = np.asarray(base.project(g, offset=50))
    ref_lift = np.asarray(base.lift(g[:2, :k], offset=50, length=1900))

    def check(got, expected, what):
        if kind == "rademacher":  # integer-valued g: every order of summation is exact
            np.testing.assert_array_equal(got, expected, err_msg=what)
        else:
            np.testing.assert_allclose(got, expected, rtol=0,
                                       atol=1e-5 * np.abs(expected).max(), err_msg=what)

    for block_d, block_k in [(1, 64), (333, 24), (4096, 1)]:
        proj = Projector(seed=21, dim=dim, k=k, kind=kind, block_d=block_d, block_k=block_k)
        check(np.asarray(proj.project(g, offset=50)), ref,
              f"project depends on block_d={block_d}, block_k={block_k}")
        check(np.asarray(proj.lift(g[:2, :k], offset=50, length=1900)), ref_lift,
              f"lift depends on block_d={block_d}, block_k={block_k}")
    pieces = [(0, 17), (17, 1024), (1024, 1900)]
    total = sum(np.asarray(base.project(g[:, a:b], offset=50 + a)) for a, b in pieces)
    check(total, ref, "sum of projects of pieces (with offsets) != project of the whole")
    lifted = np.concatenate([np.asarray(base.lift(g[:2, :k], offset=50 + a, length=b - a))
                             for a, b in pieces], axis=1)
    check(lifted, ref_lift, "lift in pieces (with offsets) != lift of the whole")


def test_jit_vmap_and_static_projector():
    proj = Projector(seed=4, dim=600, k=32, block_d=100)
    assert proj == Projector(seed=4, dim=600, k=32, block_d=100)
    assert hash(proj) == hash(Projector(seed=np.int64(4), dim=600, k=32, block_d=100))
    g = _rng(0).standard_normal((4, 3, 500)).astype(np.float32)
    batched = jax.vmap(lambda x: proj.project(x, offset=100))(g)
    one_by_one = np.stack([np.asarray(proj.project(x, offset=100)) for x in g])
    np.testing.assert_allclose(np.asarray(batched), one_by_one, rtol=1e-6, atol=1e-6,
                               err_msg="vmap(project) != project one batch at a time")

    @jax.jit
    def feats(g_NxD):  # the Projector is a closed-over static value
        return proj.project(g_NxD, offset=100)

    np.testing.assert_allclose(np.asarray(feats(g[0])), one_by_one[0], rtol=1e-6, atol=1e-6,
                               err_msg="jit(project) != project")
    f = jax.jit(lambda p, x: p.lift(x), static_argnums=0)
    w = jnp.ones((32,), jnp.float32)
    np.testing.assert_allclose(np.asarray(f(proj, w)), np.asarray(proj.lift(w)), rtol=1e-6,
                               err_msg="Projector as a static jit argument")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_bfloat16_inputs(kind):
    proj = Projector(seed=12, dim=900, k=64, kind=kind, block_d=128)
    g16 = jnp.asarray(_int_valued((3, 800), seed=2), jnp.bfloat16)  # exact in bfloat16
    got = np.asarray(proj.project(g16, offset=10))
    ref = np.asarray(proj.project(g16.astype(jnp.float32), offset=10))
    assert got.dtype == np.float32
    if kind == "rademacher":  # bf16 × exact ±1 with f32 accumulation: exact integer sums
        np.testing.assert_array_equal(got, ref, err_msg="bf16 project != f32 project")
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                                   err_msg="bf16 project != f32 project")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_johnson_lindenstrauss_at_k_1024(kind):
    # Achlioptas (2003, Thm 1.1; Dasgupta–Gupta for Gaussian): for a fixed x,
    # P(|‖Pᵀx‖² - ‖x‖²| > ε‖x‖²) <= 2 exp(-k (ε²/2 - ε³/3) / 2). With k = 1024 and ε = 0.25
    # that is 2·exp(-13.3) = 3.2e-6. So norms keep their relative error below
    # 1 - √0.75 = 0.134 < 0.15, and by polarisation (apply the bound to x ± y) inner products
    # of unit vectors move by less than ε = 0.25, each except with probability < 1e-5.
    dim, k, m = 6000, 1024, 6
    proj = Projector(seed=31, dim=dim, k=k, kind=kind)
    x = _rng(5).standard_normal((m, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.asarray(proj.project(x.astype(np.float32)), np.float64)
    rel = np.abs(np.linalg.norm(y, axis=1) - 1)
    assert rel.max() < 0.15, f"norm relative errors {rel} exceed the JL bound 0.15"
    inner_err = np.abs(y @ y.T - x @ x.T)[np.triu_indices(m, 1)]
    assert inner_err.max() < 0.25, f"inner-product errors {inner_err} exceed the JL bound 0.25"


# Memory: tracing D = 10^7, k = 4096 must never create a D×k (or anything near it) array.


def _subjaxprs(value):
    if isinstance(value, jex_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jex_core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def _created_sizes(jaxpr, sizes, prims):
    """Sizes of every value any equation creates, recursing into scan/while/cond/pjit/pallas."""
    for eqn in jaxpr.eqns:
        prims.add(eqn.primitive.name)
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", None)
            if shape is not None:
                sizes.append(math.prod(shape))
        for p in eqn.params.values():
            for sub in _subjaxprs(p):
                _created_sizes(sub, sizes, prims)
    return sizes


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_tracing_d_1e7_k_4096_creates_no_dxk_array(backend):
    dim, k, n, s = 10**7, 4096, 8, 2
    proj = Projector(seed=0, dim=dim, k=k, backend=backend)
    budget = 4 * proj.block_d * k  # the tile of the XLA path is block_d × min(block_k, k)
    g = jax.ShapeDtypeStruct((n, dim), jnp.float32)
    prims = set()
    sizes = _created_sizes(jax.make_jaxpr(proj.project)(g).jaxpr, [], prims)
    assert max(sizes) <= n * k + budget, \
        f"project creates an array of {max(sizes)} elements (D·k = {dim * k})"
    loops = {"while", "scan"} if backend == "xla" else {"pallas_call"}
    assert loops & prims and "dot_general" in prims, f"walk missed the loop body: {prims}"
    # The walk did reach the tiles: the largest tile is there and of the expected size.
    tile = proj.block_d * min(proj.block_k, k) if backend == "xla" else 64 * 128
    assert tile in sizes, f"no {tile}-element tile found; the walk did not descend"

    w = jax.ShapeDtypeStruct((s, k), jnp.float32)
    sizes = _created_sizes(jax.make_jaxpr(proj.lift)(w).jaxpr, [], set())
    # lift's output is S×D by definition (and may be created once more by the final scaling);
    # beyond it, nothing larger than a tile.
    big = sorted(x for x in sizes if x > s * k + budget)
    assert all(x == s * dim for x in big), \
        f"lift creates arrays of {big} elements; only the S×D = {s * dim} output may exceed " \
        f"the tile budget {budget} (D·k = {dim * k})"


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        Projector(seed=0, dim=10, k=4, kind="sparse")
    with pytest.raises(ValueError, match="k must be"):
        Projector(seed=0, dim=10, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        Projector(seed=0, dim=10, k=4.0)
    with pytest.raises(ValueError, match="dim must be"):
        Projector(seed=0, dim=0, k=4)
    with pytest.raises(ValueError, match="seed must be"):
        Projector(seed=-1, dim=10, k=4)
    with pytest.raises(ValueError, match="backend"):
        Projector(seed=0, dim=10, k=4, backend="cuda")
    with pytest.raises(ValueError, match="block_d"):
        Projector(seed=0, dim=10, k=4, block_d=0)

    proj = Projector(seed=0, dim=100, k=8)
    with pytest.raises(ValueError, match="offset \\+ width <= dim"):
        proj.project(np.zeros((2, 61), np.float32), offset=40)
    with pytest.raises(ValueError, match="offset must be"):
        proj.project(np.zeros((2, 10), np.float32), offset=-1)
    with pytest.raises(TypeError, match="offset must be a Python int"):
        proj.project(np.zeros((2, 10), np.float32), offset=jnp.int32(3))
    with pytest.raises(TypeError, match="g must be a float32 or bfloat16"):
        proj.project(np.zeros((2, 10), np.int32))
    with pytest.raises(ValueError, match="g must be 1-D"):
        proj.project(np.zeros((2, 2, 10), np.float32))
    with pytest.raises(ValueError, match="w must have shape"):
        proj.lift(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="exceeds dim"):
        proj.lift(np.zeros(8, np.float32), offset=90, length=11)
    with pytest.raises(ValueError, match="max_entries"):
        proj.dense(max_entries=799)
