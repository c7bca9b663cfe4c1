"""jaxgrad.gradients.pallas: the Pallas kernels of the projection (in interpret mode on CPU) equal
the XLA path, lower to Triton and Mosaic, and run under jit and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrad.gradients import pallas
from jaxgrad.gradients.pallas import _lift_pallas, _project_pallas
from jaxgrad.gradients.projection import Projector


def _rng(seed=0):
    return np.random.default_rng(seed)


def _int_valued(shape, seed=0):
    """Small integers as float32: with ±1 entries every partial sum is an exact integer, so any
    blocking or summation order gives bit-identical results."""
    return _rng(seed).integers(-8, 9, shape).astype(np.float32)


# Pallas variants in interpret mode. GPU tiles: N 16, D 64, k 128; TPU: D 512, k 256. The
# shapes leave ragged N, D (tail through XLA) and k edges in both. The GPU kernel splits its 5
# D blocks over programs: 5 splits of 1 block by default, or 2 uneven splits (3 + 2 blocks)
# when only 4 programs are targeted for its 2 output tiles.
@pytest.mark.parametrize("platform,n,width,programs", [("gpu", 5, 64 * 5 + 17, 1024),
                                                       ("gpu", 5, 64 * 5 + 17, 4),
                                                       ("tpu", 3, 512 * 2 + 76, None)])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_pallas_interpret_matches_xla(platform, n, width, programs, kind, monkeypatch):
    # Interpret mode for a platform other than the one running (the TPU kernel on a GPU, both on
    # a CPU); on a GPU the GPU kernel runs compiled by Triton, the same check.
    if platform != jax.default_backend():
        monkeypatch.setattr(pallas, "_interpret", lambda: True)
    if programs is not None:
        monkeypatch.setattr(pallas, "_GPU_PROGRAMS", programs)
    dim, k, offset = 2**33, 200, 2**32 - 300  # rows straddle 2^32 inside a kernel block
    xla = Projector(seed=8, dim=dim, k=k, kind=kind, backend="xla")
    g = _int_valued((n, width), seed=6)
    ref = np.asarray(xla.project(g, offset=offset))
    # _project_pallas returns the unscaled product; project() multiplies by 1/√k once.
    got = np.asarray(_project_pallas(xla, jnp.asarray(g), offset, platform=platform))
    got = got * np.float32(xla.scale)
    if kind == "rademacher":
        np.testing.assert_array_equal(got, ref, err_msg=f"Pallas ({platform}) project != XLA")
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=f"Pallas ({platform}) project != XLA")
    w = _rng(7).standard_normal((3, k)).astype(np.float32)
    ref_l = np.asarray(xla.lift(w, offset=offset, length=width))
    got_l = np.asarray(_lift_pallas(xla, jnp.asarray(w), offset, width, platform=platform))
    np.testing.assert_allclose(got_l, ref_l, rtol=0, atol=1e-5 * np.abs(ref_l).max(),
                               err_msg=f"Pallas ({platform}) lift != XLA")


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_pallas_kernels_lower_to_triton_and_mosaic(platform, monkeypatch):
    # Interpret mode cannot catch what only the real compilers reject (Triton: power-of-two
    # block shapes, supported ops on uint32; Mosaic: block tiling). Cross-platform lowering
    # runs those lowering rules on this CPU machine; a kernel that fails them raises here.
    from jax import export

    monkeypatch.setattr(pallas, "_interpret", lambda: False)
    target, call = {"gpu": ("cuda", "__gpu$xla.gpu.triton"),
                    "tpu": ("tpu", "tpu_custom_call")}[platform]
    checks = [export.DisabledSafetyCheck.custom_call(call)]
    for kind, dtype in [("rademacher", jnp.float32), ("gaussian", jnp.bfloat16)]:
        proj = Projector(seed=0, dim=10**11, k=1000, kind=kind, backend="pallas")
        fns = [(lambda g: _project_pallas(proj, g, 2**32 - 7, platform=platform),
                jax.ShapeDtypeStruct((40, 100_037), dtype)),
               (lambda w: _lift_pallas(proj, w, 5, 100_037, platform=platform),
                jax.ShapeDtypeStruct((3, 1000), jnp.float32))]
        for fn, arg in fns:
            exported = export.export(jax.jit(fn), platforms=[target], disabled_checks=checks)(arg)
            assert call in exported.mlir_module(), f"no {call} kernel in the {target} lowering"


def test_backend_pallas_under_jit_and_vmap():
    k = 150
    pal = Projector(seed=2, dim=5000, k=k, backend="pallas")  # interpret mode on CPU
    xla = Projector(seed=2, dim=5000, k=k, backend="xla")
    g = _int_valued((2, 3, 200), seed=9)
    got = jax.jit(jax.vmap(lambda x: pal.project(x, offset=40)))(g)
    ref = np.stack([np.asarray(xla.project(x, offset=40)) for x in g])
    np.testing.assert_array_equal(np.asarray(got), ref,
                                  err_msg="jit(vmap(project)) with the Pallas backend != XLA")
    w = _rng(3).standard_normal((2, k)).astype(np.float32)
    got_l = jax.vmap(lambda v: pal.lift(v, offset=7, length=130))(w)
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(xla.lift(w, 7, 130)), rtol=0,
                               atol=1e-6, err_msg="vmap(lift) with the Pallas backend != XLA")
