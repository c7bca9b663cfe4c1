"""jaxgrad.gradients.prng: the entries of the projection P are the documented counter-based hash
(written again in plain Python ints as the golden reference), exactly ±1/√k or standard normal
over √k, and uncorrelated across rows, columns and seeds."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxgrad.gradients.projection import Projector

# ------------------------------------------------------------------------------------------
# The documented hash, written again in plain Python ints (the golden reference for P).
# ------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _py_mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _py_entry(seed: int, d: int, j: int, k: int, kind: str) -> float:
    s = _py_mix(_py_mix(0x299F31D0 ^ (seed & _M32)) ^ (seed >> 32))
    r1, r2, c1, c2 = (_py_mix(s ^ t) for t in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344))
    row = _py_mix((_py_mix(_py_mix((d >> 32) ^ r1) ^ (d & _M32)) + r2) & _M32)
    col = _py_mix((_py_mix(j ^ c1) + c2) & _M32)
    h = _py_mix((row + col) & _M32)
    if kind == "rademacher":
        return (1 - 2 * (h >> 31)) / math.sqrt(k)
    h2 = _py_mix(h ^ 0xA4093822)
    u1, u2 = ((h >> 8) + 1) * 2.0**-24, (h2 >> 8) * 2.0**-24
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2) / math.sqrt(k)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_entries_follow_the_documented_hash(kind):
    # Rows across the 2^32 boundary exercise the (hi, lo) split and its carry.
    k, seed = 24, 2**40 + 12345
    proj = Projector(seed=seed, dim=2**41, k=k, kind=kind, block_d=4)
    # Rademacher: exactly float32(±1/√k). Gaussian: float32 rounding of log/sqrt and the
    # polynomial cos (error < 1e-9) against float64 libm, scaled by 1/√k: far below 2e-6.
    tol = 0 if kind == "rademacher" else 2e-6
    as_p = (lambda a: np.asarray(a, np.float32)) if kind == "rademacher" else np.asarray
    for start in (0, 777, 2**31 - 3, 2**32 - 5, 2**40 + 3):
        rows = np.asarray(proj.project(jnp.eye(8, dtype=jnp.float32), offset=start))
        ref = as_p([[_py_entry(seed, start + i, j, k, kind) for j in range(k)]
                    for i in range(8)])
        np.testing.assert_allclose(rows, ref, rtol=0, atol=tol,
                                   err_msg=f"rows {start}..{start + 7} of P differ from the "
                                           "documented hash (pure-Python reference)")
    small = Projector(seed=seed, dim=50, k=k, kind=kind)
    ref = as_p([[_py_entry(seed, d, j, k, kind) for j in range(k)] for d in range(50)])
    np.testing.assert_allclose(np.asarray(small.dense()), ref, rtol=0, atol=tol,
                               err_msg="dense() differs from the documented hash")


def test_rademacher_entries_are_exactly_plus_minus_inv_sqrt_k():
    proj = Projector(seed=5, dim=3000, k=100)
    p = np.asarray(proj.dense())
    assert set(np.unique(p).tolist()) == {-np.float32(0.1), np.float32(0.1)}, \
        "Rademacher entries must be exactly ±1/√k (float32)"
    # Fraction of +: a fair coin over n = 3e5 entries has sd 0.5/√n ≈ 9e-4; 6 sd is a
    # one-in-10^9 event.
    frac = np.mean(p > 0)
    assert abs(frac - 0.5) < 6 * 0.5 / math.sqrt(p.size), f"fraction of + signs is {frac}"


def test_gaussian_entries_are_standard_normal_over_sqrt_k():
    k = 256
    z = np.asarray(Projector(seed=9, dim=4096, k=k, kind="gaussian").dense(),
                   np.float64).ravel() * math.sqrt(k)
    n = z.size  # 2^20 samples
    # Standard errors for N(0,1): mean 1/√n ≈ 1e-3, variance √(2/n) ≈ 1.4e-3, excess kurtosis
    # √(24/n) ≈ 4.8e-3. Bounds at 6 standard errors (a one-in-10^9 event for a true normal).
    assert abs(z.mean()) < 6 / math.sqrt(n), f"mean of √k·P is {z.mean()}"
    assert abs(z.var() - 1) < 6 * math.sqrt(2 / n), f"variance of √k·P is {z.var()}"
    kurt = scipy.stats.kurtosis(z)
    assert abs(kurt) < 6 * math.sqrt(24 / n), f"excess kurtosis of √k·P is {kurt}"
    # Kolmogorov–Smirnov against N(0,1): by the DKW inequality P(D_n > t) <= 2 exp(-2 n t²),
    # so t = 0.003 is exceeded with probability 2·exp(-18.9) ≈ 1e-8.
    ks = scipy.stats.kstest(z, "norm").statistic
    assert ks < 0.003, f"KS distance of √k·P from N(0, 1) is {ks}"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_rows_columns_and_seeds_are_uncorrelated(kind):
    dim, k = 2048, 512
    s = np.asarray(Projector(seed=1, dim=dim, k=k, kind=kind).dense(), np.float64) * math.sqrt(k)
    # For independent entries with unit variance, a correlation over m pairs has sd ≈ 1/√m
    # (for the Gaussian kind the products have variance 1, for ±1 exactly 1). Each check below
    # takes the max over at most ~2000 correlations; 6/√m bounds each with probability
    # 1 - 2e-9, so the max with probability > 1 - 1e-5.
    adjacent_rows = np.sum(s[1:] * s[:-1], axis=1) / k
    assert np.abs(adjacent_rows).max() < 6 / math.sqrt(k), "adjacent rows of P are correlated"
    adjacent_cols = np.sum(s[:, 1:] * s[:, :-1], axis=0) / dim
    assert np.abs(adjacent_cols).max() < 6 / math.sqrt(dim), "adjacent columns are correlated"
    assert not np.any(np.all(s[1:] == s[:-1], axis=1)), "two adjacent rows are identical"
    # Different seeds, including seeds that differ only in the high 32-bit word.
    for other_seed in (2, 1 + 2**32):
        t = np.asarray(Projector(seed=other_seed, dim=dim, k=k, kind=kind).dense(),
                       np.float64) * math.sqrt(k)
        corr = np.mean(s * t)
        assert abs(corr) < 6 / math.sqrt(s.size), \
            f"P for seeds 1 and {other_seed} are correlated ({corr})"
        same = np.mean(np.sign(s) == np.sign(t))
        assert abs(same - 0.5) < 6 * 0.5 / math.sqrt(s.size), \
            f"seeds 1 and {other_seed} agree in sign on a fraction {same} of entries"
