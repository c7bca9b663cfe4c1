"""The counter-based hash the random projection P is made of: entry ``P[d, j]`` is a pure
function of ``(seed, d, j)``, so any tile of P can be regenerated on the fly, on any device, in any
order (:mod:`jaxgrad.gradients.projection` describes the projector built on it). The XLA path
(:mod:`jaxgrad.gradients.xla`) and the Pallas kernels (:mod:`jaxgrad.gradients.pallas`) call the
same functions below, so P is bit-identical whichever computes it.

The hash (all arithmetic on uint32 words, wrapping mod 2^32)
-------------------------------------------------------------
``mix`` is Chris Wellons' "lowbias32" finaliser (hash-prospector; public domain)::

    mix(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16

It is a bijection of uint32 (xorshifts and odd multipliers are invertible) with one of the
lowest avalanche biases known for a two-multiply 32-bit mixer: flipping any input bit flips
each output bit with probability ≈ 1/2. Measured here: for 2^20 random states s and ~600 fixed
differences δ (small, powers of two, random; additive and xor), the correlation between the top
bits of mix(s) and mix(s ⊕/+ δ) stays below 0.0033, i.e. at the sampling noise (3/√2^20).

With the 64-bit seed split into words (seed_hi, seed_lo), the row index d into (d_hi, d_lo)
and the column index j < 2^31::

    s     = mix(mix(0x299F31D0 ^ seed_lo) ^ seed_hi)                   # seed state
    R1, R2, C1, C2 = mix(s ^ 0x243F6A88), mix(s ^ 0x85A308D3),
                     mix(s ^ 0x13198A2E), mix(s ^ 0x03707344)          # seed keys (π digits)
    row_d = mix(mix(mix(d_hi ^ R1) ^ d_lo) + R2)                       # row key
    col_j = mix(mix(j ^ C1) + C2)                                      # column key
    h     = mix(row_d + col_j)                                         # entry word

* Rademacher: ``P[d, j] = (1 - 2·(h >> 31)) / √k`` (the top bit of h is the sign).
* Gaussian: a second word ``h2 = mix(h ^ 0xA4093822)``, ``u1 = ((h >> 8) + 1)·2^-24 ∈ (0, 1]``,
  ``u2 = (h2 >> 8)·2^-24 ∈ [0, 1)``, and Box–Muller ``P[d, j] = √(-2 ln u1)·cos(2π u2) / √k``
  (|z| ≤ 5.77; the tail beyond has probability 8e-9). cos(2πu) is an odd Taylor polynomial
  after an exact range reduction (``_cos_2pi``, error < 1e-9 before float32 rounding): XLA's
  cos made the Gaussian kind 13× slower on CPU and differs between backends.

Why it is well mixed: the seed keys go through two rounds of mix, so different seeds give
unrelated keys (not shifted or permuted copies of each other). For a fixed seed and d_hi, the
row key is a bijection of d_lo, and the column key a bijection of j: no two rows (for D < 2^32)
and no two columns share a key, so no two rows or columns of P are copies of each other (a
32-bit hash of (d, j) would give ~10^6 duplicated row pairs at D = 10^8 by the birthday bound).
The entry word is one more mix of the sum of the two keys; since mix is a bijection, the
entries along a row (or a column) are distinct words. Row and column keys cost O(rows + cols)
per tile; the per-entry cost is one add and one mix (8 integer ops) plus the sign, which is
what bounds the speed of the projection when N is small.

The indices are 64-bit safe without jax x64: d is carried as two uint32 words (hi, lo) with
the carry propagated explicitly, so ``dim`` and offsets may go up to 2^63.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# lowbias32 multipliers (C. Wellons, hash-prospector, public domain).
_MIX_MUL1 = 0x7FEB352D
_MIX_MUL2 = 0x846CA68B
# Domain-separation words: the hexadecimal digits of π's fractional part.
_SEED_INIT = 0x299F31D0
_TAG_ROW1 = 0x243F6A88
_TAG_ROW2 = 0x85A308D3
_TAG_COL1 = 0x13198A2E
_TAG_COL2 = 0x03707344
_TAG_NORMAL = 0xA4093822


def _u32(x: int) -> np.uint32:
    return np.uint32(x & 0xFFFFFFFF)


def _mix(x):
    """lowbias32: a bijective uint32 finaliser. Works on numpy and jax uint32 arrays alike."""
    x = x ^ (x >> 16)
    x = x * _u32(_MIX_MUL1)
    x = x ^ (x >> 15)
    x = x * _u32(_MIX_MUL2)
    return x ^ (x >> 16)


@dataclasses.dataclass(frozen=True)
class _Keys:
    """The four per-seed key words (plain ints, so they enter kernels as literals)."""

    row1: int
    row2: int
    col1: int
    col2: int


def _seed_keys(seed: int) -> _Keys:
    """Seed keys, computed with the same ``_mix`` on numpy uint32 arrays."""
    lo = np.array([seed & 0xFFFFFFFF], np.uint32)
    hi = np.array([(seed >> 32) & 0xFFFFFFFF], np.uint32)
    s = _mix(_mix(np.array([_SEED_INIT], np.uint32) ^ lo) ^ hi)
    words = [int(_mix(s ^ _u32(tag))[0]) for tag in (_TAG_ROW1, _TAG_ROW2, _TAG_COL1, _TAG_COL2)]
    return _Keys(*words)


def _row_words(offset: int, local_start: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) uint32 words of rows ``offset + local_start + [0, n)``, carry propagated.

    ``offset`` is a Python int (< 2^63); ``local_start`` a uint32 scalar with
    ``local_start + n <= 2^32``.
    """
    lo0, hi0 = _u32(offset), _u32(offset >> 32)
    local = local_start + lax.iota(jnp.int32, n).astype(jnp.uint32)
    lo = local + lo0
    hi = (lo < lo0).astype(jnp.uint32) + hi0
    return lo, hi


def _row_keys(keys: _Keys, d_lo: jax.Array, d_hi: jax.Array) -> jax.Array:
    """Row keys: a bijection of d_lo for fixed (seed, d_hi)."""
    t = _mix(d_hi ^ _u32(keys.row1))
    return _mix(_mix(t ^ d_lo) + _u32(keys.row2))


def _col_keys(keys: _Keys, j: jax.Array) -> jax.Array:
    """Column keys (j as uint32): a bijection of j for a fixed seed."""
    return _mix(_mix(j ^ _u32(keys.col1)) + _u32(keys.col2))


def _entries(row_keys_R: jax.Array, col_keys_C: jax.Array, kind: str, dtype: Any) -> jax.Array:
    """The R×C tile of unscaled entries (±1 or N(0, 1)) for the given row and column keys."""
    h = _mix(row_keys_R[:, None] + col_keys_C[None, :])
    if kind == "rademacher":
        bit = (h >> 31).astype(jnp.int32)
        return (1 - 2 * bit).astype(dtype)
    h2 = _mix(h ^ _u32(_TAG_NORMAL))
    u1 = ((h >> 8).astype(jnp.int32) + 1).astype(jnp.float32) * (2.0**-24)
    u2 = (h2 >> 8).astype(jnp.int32).astype(jnp.float32) * (2.0**-24)
    z = jnp.sqrt(-2.0 * jnp.log(u1)) * _cos_2pi(u2)
    return z.astype(dtype)


# sin(2πa) = Σ_n c_n a^(2n+1) on |a| <= 1/4 (Taylor; the first omitted term is < 7e-10).
_SIN_2PI_COEFFS = tuple(
    (-1) ** n * (2 * math.pi) ** (2 * n + 1) / math.factorial(2 * n + 1) for n in range(7))


def _cos_2pi(u: jax.Array) -> jax.Array:
    """cos(2πu) for u in [0, 1) from + and × only (no libm cos: the same on every backend, and
    ~8× cheaper than XLA's cos on CPU): cos(2πu) = -sin(2πa) with a = 1/4 - |u - 1/2|, exact
    in float32 for u on the 2^-24 grid, then an odd polynomial in a (Horner)."""
    a = 0.25 - jnp.abs(u - 0.5)
    a2 = a * a
    acc = jnp.float32(_SIN_2PI_COEFFS[-1])
    for c in _SIN_2PI_COEFFS[-2::-1]:
        acc = acc * a2 + jnp.float32(c)
    return -(acc * a)


def _col_range(start, n: int) -> jax.Array:
    return start + lax.iota(jnp.int32, n).astype(jnp.uint32)

