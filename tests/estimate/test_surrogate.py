"""jaxgrad.estimate.surrogate (and its solver): batched fits against scikit-learn and scipy.

References are independent: scikit-learn's liblinear for gradex, scipy L-BFGS-B on the
objective written out in NumPy float64 for one_class/taylor. Data are small (N = 240 samples in
6 sources, k = 12) and share shapes across tests so the jitted solver compiles a few times only.
The lift and the estimates are tests/estimate/test_lift.py's (the 8-device test here shards
exact_estimates too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from sklearn.linear_model import LogisticRegression

from jaxgrad.common import flat
from jaxgrad.estimate.lift import exact_estimates
from jaxgrad.estimate.surrogate import fit_subsets, gradex_labels
from jaxgrad.gradients.projection import Projector

N, K, N_SOURCES = 240, 12, 6


def _data(seed=0, scale=1.0):
    """Projected-gradient-like features: a shared direction, a per-source direction, noise,
    and per-sample norms spread over two decades (times ``scale``)."""
    rng = np.random.default_rng(seed)
    src = np.repeat(np.arange(N_SOURCES), N // N_SOURCES)
    common = rng.normal(size=K)
    per_source = rng.normal(size=(N_SOURCES, K))
    x = 0.6 * common + 0.6 * per_source[src] + rng.normal(size=(N, K))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= np.exp(rng.uniform(-1.5, 1.5, size=N))[:, None] * scale
    labels = (rng.random(N) < 0.7).astype(np.int64)
    # Four subsets of sources (unions of sources, as in GradEx).
    subsets = np.array([[1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 1],
                        [1, 1, 1, 1, 1, 1]], bool)
    return x.astype(np.float32), labels, subsets[:, src]


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _liblinear(x, y, mask, C, tight=True):
    kw = dict(tol=1e-12, max_iter=100_000) if tight else {}
    xs = (2 * y[mask] - 1)[:, None] * x[mask].astype(np.float64)
    clf = LogisticRegression(C=C, solver="liblinear", **kw).fit(xs, y[mask])
    return clf.coef_[0], clf.intercept_[0]


@pytest.mark.parametrize("scale", [1e-2, 1e2])
@pytest.mark.parametrize("C", [1e-4, 1e-2, 1.0])
def test_gradex_matches_liblinear(C, scale):
    x, y, masks = _data(scale=scale)
    fits = fit_subsets(x, masks, objective="gradex", C=C, labels=y)
    v_norm = jnp.sqrt(jnp.sum(fits.coef**2, axis=1) + fits.intercept**2)
    # ‖v - v*‖ ≤ grad_norm (1-strong convexity): every fit is certified to 1e-3 relative. At
    # C·|x|² ~ 1e4 float32 rounding in the computed gradient (~5e-4 relative here) keeps the
    # 1e-5 default tolerance out of reach (converged=False), although the coefficients are far
    # more accurate than that (~1e-6 from liblinear); test_float64_fits_reach_tight_tolerance
    # certifies that regime in float64.
    assert bool(jnp.all(fits.grad_norm <= 1e-3 * v_norm)), (
        f"uncertified fits: grad_norm {fits.grad_norm} vs |v| {v_norm}")
    if C < 1.0 or scale < 1.0:
        assert bool(jnp.all(fits.converged)), f"not converged: grad_norm {fits.grad_norm}"
    for s in range(masks.shape[0]):
        coef, b = _liblinear(x, y, masks[s], C)
        assert _rel(fits.coef[s], coef) < 1e-3, (
            f"subset {s}, C={C}, |x|~{scale}: coef differs from liblinear by "
            f"{_rel(fits.coef[s], coef):.2e} relative")
        b_tol = 1e-3 * max(abs(b), 1e-3 * np.linalg.norm(coef))
        assert abs(float(fits.intercept[s]) - b) < b_tol, (
            f"subset {s}, C={C}: intercept {float(fits.intercept[s])} vs liblinear {b}")


def test_gradex_matches_liblinear_default_settings():
    """The seed's exact call, LogisticRegression(penalty='l2', C=1e-4, solver='liblinear') with
    default tolerance, at projected-gradient scale ~1."""
    x, y, masks = _data(seed=1)
    fits = fit_subsets(x, masks, C=1e-4, labels=y)
    for s in range(masks.shape[0]):
        coef, b = _liblinear(x, y, masks[s], 1e-4, tight=False)
        assert _rel(fits.coef[s], coef) < 1e-3
        assert abs(float(fits.intercept[s]) - b) < 1e-3 * abs(b)


def test_gradex_seed_labels_are_reproducible_and_match_liblinear():
    x, _, masks = _data(seed=2)
    a = fit_subsets(x, masks, C=1e-2, seed=7)
    b = fit_subsets(x, masks, C=1e-2, seed=7)
    np.testing.assert_array_equal(np.asarray(a.coef), np.asarray(b.coef),
                                  err_msg="same seed gave different fits")
    y = np.asarray(gradex_labels(N, seed=7))
    assert set(np.unique(y)) == {0, 1} and 0.55 < y.mean() < 0.85, f"labels mean {y.mean()}"
    np.testing.assert_array_equal(y, np.asarray(gradex_labels(N, seed=7)))
    coef, _ = _liblinear(x, y, masks[0], 1e-2)
    assert _rel(a.coef[0], coef) < 1e-3, "seed-drawn labels are not gradex_labels(N, seed)"
    other = fit_subsets(x, masks, C=1e-2, seed=8)
    assert not np.allclose(np.asarray(other.intercept), np.asarray(a.intercept)), (
        "a different seed should draw different labels")


def _lbfgs(x, mask, C, offsets=None):
    """argmin_w Σ_{i∈S} log(1+exp(-(o_i + x_iᵀw))) + ‖w‖²/(2C), in float64."""
    xs = x[mask].astype(np.float64)
    o = np.zeros(len(xs)) if offsets is None else offsets[mask].astype(np.float64)

    def fun(w):
        z = o + xs @ w
        loss = np.sum(np.logaddexp(0.0, -z)) + w @ w / (2 * C)
        grad = -xs.T @ scipy.special.expit(-z) + w / C
        return loss, grad

    res = scipy.optimize.minimize(fun, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B",
                                  options=dict(gtol=1e-12, ftol=1e-15, maxiter=20_000))
    return res.x


@pytest.mark.parametrize("C", [1e-2, 1.0])
def test_one_class_matches_scipy(C):
    x, _, masks = _data(seed=3)
    fits = fit_subsets(x, masks, objective="one_class", C=C)
    assert bool(jnp.all(fits.converged))
    np.testing.assert_array_equal(np.asarray(fits.intercept), 0.0)
    for s in range(masks.shape[0]):
        ref = _lbfgs(x, masks[s], C)
        assert _rel(fits.coef[s], ref) < 1e-4, f"subset {s}: {_rel(fits.coef[s], ref):.2e}"


@pytest.mark.parametrize("C", [1e-2, 1.0])
def test_taylor_matches_scipy(C):
    x, _, masks = _data(seed=4)
    offsets = np.random.default_rng(4).normal(scale=2.0, size=N).astype(np.float32)
    fits = fit_subsets(x, masks, objective="taylor", C=C, offsets=offsets)
    assert bool(jnp.all(fits.converged))
    for s in range(masks.shape[0]):
        ref = _lbfgs(x, masks[s], C, offsets)
        assert _rel(fits.coef[s], ref) < 1e-4, f"subset {s}: {_rel(fits.coef[s], ref):.2e}"


def test_float64_fits_reach_tight_tolerance():
    x, y, masks = _data(seed=5, scale=10.0)
    with jax.enable_x64(True):
        fits = fit_subsets(x.astype(np.float64), masks, C=1.0, labels=y, tol=1e-10)
        assert fits.coef.dtype == jnp.float64
        assert bool(jnp.all(fits.converged))
        for s in range(masks.shape[0]):
            coef, b = _liblinear(x, y, masks[s], 1.0)
            assert _rel(fits.coef[s], coef) < 1e-7, f"subset {s}: {_rel(fits.coef[s], coef):.2e}"


def test_sample_weights_match_liblinear():
    x, y, masks = _data(seed=6)
    weights = masks[:2] * np.random.default_rng(6).integers(1, 4, size=N)
    fits = fit_subsets(x, weights.astype(np.float32), C=1e-2, labels=y)
    for s in range(2):
        xs = (2 * y - 1)[:, None] * x.astype(np.float64)
        keep = weights[s] > 0
        clf = LogisticRegression(C=1e-2, solver="liblinear", tol=1e-12, max_iter=100_000)
        clf.fit(xs[keep], y[keep], sample_weight=weights[s][keep])
        assert _rel(fits.coef[s], clf.coef_[0]) < 1e-3


def test_batched_equals_one_at_a_time_and_chunked_equals_unchunked():
    x, y, masks = _data(seed=7)
    batched = fit_subsets(x, masks, C=1.0, labels=y)
    chunked = fit_subsets(x, masks, C=1.0, labels=y, chunk_size=3)
    # Each fit is certified within tol/(1-tol) ≈ 1e-5 of the optimum: two fits within ~2e-5.
    for s in range(masks.shape[0]):
        alone = fit_subsets(x, masks[s:s + 1], C=1.0, labels=y)
        ref = np.concatenate([np.asarray(alone.coef[0]), [float(alone.intercept[0])]])
        for name, fits in (("batched", batched), ("chunked", chunked)):
            got = np.concatenate([np.asarray(fits.coef[s]), [float(fits.intercept[s])]])
            assert _rel(got, ref) < 3e-5, f"{name} fit of subset {s} differs from a lone fit"
    assert batched.coef.shape == chunked.coef.shape == (masks.shape[0], K)


def test_empty_and_single_sample_subsets():
    x, y, _ = _data(seed=8)
    masks = np.zeros((4, N), bool)
    masks[1, 17] = True
    masks[2, :] = True
    for objective, kw in (("gradex", dict(labels=y)), ("one_class", {}),
                          ("taylor", dict(offsets=np.full(N, 0.5, np.float32)))):
        fits = fit_subsets(x, masks, objective=objective, C=1.0, **kw)
        for field in fits:
            assert bool(jnp.all(jnp.isfinite(jnp.asarray(field, jnp.float32)))), (
                f"{objective}: non-finite entries in {field}")
        for s in (0, 3):
            assert float(jnp.abs(fits.coef[s]).max()) == 0.0 and float(fits.intercept[s]) == 0.0
            assert bool(fits.converged[s]) and int(fits.n_iter[s]) == 0
        assert bool(fits.converged[1])
    fits = fit_subsets(x, masks, objective="one_class", C=1.0)
    ref = _lbfgs(x, masks[1], 1.0)
    assert _rel(fits.coef[1], ref) < 1e-4, "the one-sample fit is not the optimum"


def test_warm_start_from_solution_stops_at_once():
    x, y, masks = _data(seed=9)
    fits = fit_subsets(x, masks, C=1e-2, labels=y)
    again = fit_subsets(x, masks, C=1e-2, labels=y, init=fits)
    assert int(jnp.max(again.n_iter)) <= 1, f"warm start took {again.n_iter} iterations"
    for s in range(masks.shape[0]):
        assert _rel(again.coef[s], np.asarray(fits.coef[s])) < 3e-5


@pytest.mark.parametrize("C", [1.0, 1e-4])
def test_preconditioners_agree(C):
    """eig, diag, none and auto reach the same solutions (the preconditioner changes the path
    only); at C = 1e-4 auto drops the preconditioner, at C = 1 it keeps one."""
    x, y, masks = _data(seed=10)
    fits = {p: fit_subsets(x, masks, C=C, labels=y, precondition=p)
            for p in ("eig", "diag", "none", "auto")}
    for p in ("diag", "none", "auto"):
        assert bool(jnp.all(fits[p].converged)), p
        for s in range(masks.shape[0]):
            assert _rel(fits[p].coef[s], np.asarray(fits["eig"].coef[s])) < 3e-5, (p, s)
    bound = C * 0.25 * float(np.max(np.sum(np.asarray(x, np.float64) ** 2, axis=0)))
    assert (bound <= 0.05) == (C == 1e-4), f"test data no longer spans both regimes ({bound})"
    same = "none" if C == 1e-4 else "eig"
    np.testing.assert_array_equal(fits["auto"].coef, fits[same].coef,
                                  err_msg=f"auto should pick {same!r} at C={C}")


def test_fit_subsets_rejects_bad_input():
    x, y, masks = _data()
    bad = x.copy()
    bad[3, 1], bad[10, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"NaN or inf in 2 of 240 rows \(first: row 3\)"):
        fit_subsets(bad, masks)
    with pytest.raises(ValueError, match=r"\(4, 239\).*N = 240"):
        fit_subsets(x, masks[:, 1:])
    with pytest.raises(ValueError, match="must be 2-D"):
        fit_subsets(x[0], masks)
    with pytest.raises(ValueError, match="objective must be one of"):
        fit_subsets(x, masks, objective="svm")
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\)"):
        fit_subsets(x, masks, labels=y[:5])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        fit_subsets(x, masks, labels=2 * y - 1)
    with pytest.raises(ValueError, match="needs offsets"):
        fit_subsets(x, masks, objective="taylor")
    with pytest.raises(ValueError, match="only used by objective='taylor'"):
        fit_subsets(x, masks, offsets=np.zeros(N))
    with pytest.raises(ValueError, match="C must be finite and > 0"):
        fit_subsets(x, masks, C=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        fit_subsets(x, -masks.astype(np.float32))


def test_subsets_sharded_over_8_devices_equal_one_device(tmp_path):
    """fit_subsets(mesh=...) on 8 fake CPU devices: every subset's fit (coef, intercept, the
    iteration count and convergence) as on one device, up to float32 rounding (a device's
    matmuls run over fewer subsets and may sum in another order)."""
    import os
    import subprocess
    import sys
    import textwrap

    x, y, masks = _data(seed=3)
    rng = np.random.default_rng(0)
    many = rng.random((37, N)) < 0.5  # 37 subsets: not a multiple of 8, padded per device
    np.savez(tmp_path / "in.npz", x=x, y=y, masks=np.concatenate([masks, many]))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, jax, numpy as np
        from jaxgrad.estimate.surrogate import fit_subsets
        assert jax.device_count() == 8
        d = np.load({str(tmp_path / "in.npz")!r})
        mesh = jax.make_mesh((8, 1), ("data", "model"))
        fits = fit_subsets(d["x"], d["masks"], C=1.0, labels=d["y"], chunk_size=16, mesh=mesh)
        from test_surrogate import _exact_case
        exact = _exact_case(mesh)
        np.savez(sys.argv[1], coef=np.asarray(fits.coef), b=np.asarray(fits.intercept),
                 it=np.asarray(fits.n_iter), conv=np.asarray(fits.converged), exact=exact)
    """))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    d = np.load(tmp_path / "in.npz")
    ref = fit_subsets(d["x"], d["masks"], C=1.0, labels=d["y"], chunk_size=16)
    np.testing.assert_allclose(got["coef"], np.asarray(ref.coef), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["b"], np.asarray(ref.intercept), rtol=1e-4, atol=1e-6)
    assert got["conv"].all() and np.asarray(ref.converged).all()
    assert np.abs(got["it"] - np.asarray(ref.n_iter)).max() <= 1, "iteration counts differ"
    np.testing.assert_allclose(got["exact"], _exact_case(None), rtol=1e-5,
                               err_msg="exact_estimates on 8 devices differ from one device")


def _exact_case(mesh):
    """exact_estimates of 11 subsets (chunks of 3, rounded up to the mesh) on a small tree."""
    rng = np.random.default_rng(5)
    theta = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    proj = Projector(seed=3, dim=flat.flat_spec(theta).size, k=K)
    inputs = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)

    def loss_fn(params):
        return jnp.mean(jnp.tanh(inputs @ params["a"].T).sum(1) * params["b"].sum())

    coef = rng.normal(size=(11, K)).astype(np.float32)
    c = np.full(11, 0.1, np.float32)
    return np.asarray(exact_estimates(loss_fn, theta, coef, c, proj, chunk_size=3, mesh=mesh))
