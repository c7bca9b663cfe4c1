"""Counter-based random projection: ``Pᵀg`` and ``P w`` without ever holding the D×k matrix P.

GradEx stores ``x_i = Pᵀ g_i`` for every training sample, with g_i the D-vector of LoRA
gradients (D up to ~10^8) and P a D×k random matrix (k = 100…8192) with entries ±1/√k
(Rademacher) or N(0, 1/k) (Gaussian). Materialising P costs D·k numbers (the reference code kept
7.5 GB of float64). Here P is never stored: entry ``P[d, j]`` is a pure function of
``(seed, d, j)`` computed by an integer hash, so any tile of P can be regenerated on the fly, on
any device, in any order. The entries are bit-identical however the work is split (device type,
device count, chunking of samples or of D, block sizes, XLA or Pallas); results then differ only
by the order of float32 summation.

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

Layout of the computation
-------------------------
``project(g_NxD, offset)`` returns ``g @ P[offset:offset+D]`` (N×k, float32). The XLA path loops
(``lax.fori_loop``) over blocks of ``block_d`` rows of P and, inside, over tiles of ``block_k``
columns; each step regenerates that block_d × block_k tile from the hash, multiplies and
accumulates in float32. The ragged last block is handled once, with static shapes, after the
loop. Memory is O(N·k + block_d·block_k) whatever D·k is. ``lift(w, offset, length)`` computes
``P[offset:offset+length] @ w`` the same way, ``gram()`` accumulates PᵀP blockwise and ``dense()``
materialises P for small sizes (tests, debugging).

``offset`` lets a caller project one parameter leaf at a time (the leaf occupying rows
offset…offset+D_g of P) and sum over leaves, without concatenating them.

Pallas kernels (GPU and TPU) generate the tiles in-kernel with the same hash code (the plain
jnp functions below are used by both paths) and multiply them on the tensor cores / MXU:

* GPU (Triton) ``project``: the grid runs over (N tiles, k tiles, D splits); each program loops
  over its split of D in blocks of 64 rows (masked loads for the ragged N edge), accumulating a
  float32 tile in registers; XLA sums the few partial tiles (split-K, so that ~1000 programs
  run even when N·k gives only a few dozen tiles).
* TPU (Mosaic) ``project``: the grid is (N tiles, k tiles, D blocks) with D as the sequential
  reduction axis, accumulating into the resident output block.
* ``lift``: grid over (S tiles, D blocks), all independent, looping over k tiles in-kernel;
  Triton stores the edge tiles with a mask, Mosaic clips edge blocks itself.

Rows of D that do not fill a whole kernel block are projected by the XLA path (same entries).
On CPU Pallas runs only in interpret mode, chosen automatically, so tests can force
``backend="pallas"`` and check it against the XLA path.

Numerics: Rademacher entries are generated as exact ±1 in the compute dtype and the 1/√k scale
is applied once to the float32 result. bfloat16 inputs are multiplied in bfloat16 against the
exact ±1 tile with float32 accumulation (each product is exact, so this equals upcasting);
for the Gaussian kind bfloat16 inputs are upcast to float32 (a bfloat16 Gaussian tile would
round P itself). float32 matmuls use ``Precision.HIGHEST`` (no TF32 rounding of g on GPUs).
Rademacher P is bit-identical on every platform; Gaussian entries can differ in the last ulp
between platforms (log/cos implementations).

Example::

    proj = Projector(seed=0, dim=10**8, k=4096)
    feats_NxK = proj.project(grads_NxD)                     # x_i = Pᵀ g_i
    feats_NxK = sum(proj.project(leaf, offset=o) for o, leaf in leaves)   # same, leaf by leaf
    delta_D = proj.lift(w_K)                                # Δ = P w
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxgrad.config import PROJECTION_KINDS

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
_BACKENDS = ("auto", "xla", "pallas")
_MAX_DIM = 2**63
_MAX_K = 2**20
_MAX_WIDTH = 2**31 - 1  # widest g (or lift length) in one call: int32 array indexing
_DEFAULT_MAX_DENSE = 2**24

# Pallas tiles. GPU (Triton): powers of two >= 16 (tl.dot), float32 accumulator in registers.
_GPU_TILE_N = 64  # at most; fewer rows when N is small (>= 16)
_GPU_TILE_D = 64
_GPU_TILE_K = 128
_GPU_TILE_S = 64  # lift: rows of w per program (at most)
_GPU_TILE_L = 64  # lift: rows of P per program
_GPU_PROGRAMS = 1024  # project splits D so that about this many programs run (~8 per SM)
# TPU (Mosaic): last two block dims multiples of (8, 128).
_TPU_TILE_N = 256
_TPU_TILE_D = 512
_TPU_TILE_K = 256
_TPU_TILE_S = 8
_TPU_TILE_L = 512


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


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Projector:
    """A D×k random projection P whose entries are a hash of (seed, d, j); P is never stored.

    Frozen and hashable, so it can be a static argument of ``jax.jit``.

    Attributes:
      seed: any int in [0, 2^64). The same seed gives the same P everywhere.
      dim: D, the number of rows of P (trainable parameters), 1 ≤ dim < 2^63.
      k: the projected dimension, 1 ≤ k ≤ 2^20.
      kind: ``"rademacher"`` (±1/√k) or ``"gaussian"`` (N(0, 1/k)).
      block_d: rows of P generated per step of the XLA path (memory ∝ block_d·block_k).
      block_k: columns of P generated per step of the XLA path. The Pallas kernels use their
        own hardware tile sizes; P itself depends on no block size.
      backend: ``"auto"`` (Pallas on GPU/TPU, XLA on CPU), ``"xla"`` or ``"pallas"`` (on CPU
        Pallas runs in interpret mode: slow, for tests).
    """

    seed: int
    dim: int
    k: int
    kind: str = "rademacher"
    block_d: int = 1024
    block_k: int = 2048
    backend: str = "auto"

    def __post_init__(self):
        _check_int("seed", self.seed, 0, 2**64 - 1)
        _check_int("dim", self.dim, 1, _MAX_DIM - 1)
        _check_int("k", self.k, 1, _MAX_K)
        _check_int("block_d", self.block_d, 1, 2**20)
        _check_int("block_k", self.block_k, 1, _MAX_K)
        if self.kind not in PROJECTION_KINDS:
            raise ValueError(f"kind must be one of {PROJECTION_KINDS}, got {self.kind!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        # Normalise numpy ints to Python ints so equal projectors hash equally.
        for name in ("seed", "dim", "k", "block_d", "block_k"):
            object.__setattr__(self, name, int(getattr(self, name)))

    @functools.cached_property
    def _keys(self) -> _Keys:
        return _seed_keys(self.seed)

    @property
    def scale(self) -> float:
        """1/√k, the magnitude of the Rademacher entries and the Gaussian standard deviation."""
        return 1.0 / math.sqrt(self.k)

    def project(self, g: jax.typing.ArrayLike, offset: int = 0) -> jax.Array:
        """``g @ P[offset:offset + D_g]``: the projection of gradients occupying those rows.

        Args:
          g: gradients, N×D_g (or a single D_g-vector), float32 or bfloat16.
          offset: the row of P where g's first coordinate sits (a Python int), so that
            ``offset + D_g <= dim``. Summing ``project(leaf, offset_of_leaf)`` over leaves
            equals projecting the concatenation.

        Returns:
          N×k float32 (k float32 for a 1-D g).
        """
        g = _as_float_array("g", g)
        if g.ndim not in (1, 2):
            raise ValueError(f"g must be 1-D (D,) or 2-D (N, D), got shape {g.shape}")
        offset = _check_offset(offset, self.dim)
        width = g.shape[-1]
        if width > self.dim - offset:
            raise ValueError(
                f"g has width {width} but only dim - offset = {self.dim} - {offset} = "
                f"{self.dim - offset} rows of P remain; g must satisfy offset + width <= dim")
        if width > _MAX_WIDTH:
            raise ValueError(f"g has width {width} > {_MAX_WIDTH}; project it in pieces "
                             "with offsets")
        if g.ndim == 1:
            return _project(self, g[None, :], offset)[0]
        return _project(self, g, offset)

    def lift(self, w: jax.typing.ArrayLike, offset: int = 0,
             length: int | None = None) -> jax.Array:
        """``P[offset:offset + length] @ w``: a direction in projected space lifted to D.

        Args:
          w: a k-vector or S×k (S directions).
          offset: first row of P (a Python int).
          length: number of rows (default ``dim - offset``).

        Returns:
          ``length`` float32 numbers (S×length for a 2-D w). ⟨project(g), w⟩ = ⟨g, lift(w)⟩.
        """
        w = _as_float_array("w", w)
        if w.ndim not in (1, 2) or w.shape[-1] != self.k:
            raise ValueError(f"w must have shape (k,) or (S, k) with k = {self.k}, "
                             f"got shape {w.shape}")
        offset = _check_offset(offset, self.dim)
        if length is None:
            length = self.dim - offset
            if length > _MAX_WIDTH:
                raise ValueError(f"lift over the remaining dim - offset = {length} rows needs an "
                                 f"explicit length <= {_MAX_WIDTH}: lift in pieces with offsets")
        length = _check_int("length", length, 0, _MAX_WIDTH)
        if length > self.dim - offset:
            raise ValueError(f"offset + length = {offset} + {length} exceeds dim = {self.dim}")
        if w.ndim == 1:
            return _lift(self, w[None, :], offset, length)[0]
        return _lift(self, w, offset, length)

    def gram(self) -> jax.Array:
        """PᵀP (k×k, float32), accumulated over blocks of rows: ‖P w‖² = wᵀ gram w.

        Costs dim·k² multiply-adds; dim must be < 2^31.
        """
        if self.dim > _MAX_WIDTH:
            raise ValueError(f"gram() needs dim <= {_MAX_WIDTH} (it costs dim·k² flops), "
                             f"got dim = {self.dim}")
        return _gram(self)

    def dense(self, max_entries: int = _DEFAULT_MAX_DENSE) -> jax.Array:
        """The whole D×k matrix P (float32), for small sizes: tests and debugging.

        Raises:
          ValueError: if dim·k > max_entries.
        """
        max_entries = _check_int("max_entries", max_entries, 0, 2**62)
        if self.dim * self.k > max_entries:
            raise ValueError(
                f"dense() would create dim·k = {self.dim}·{self.k} = {self.dim * self.k} "
                f"entries > max_entries = {max_entries}; use project/lift, which never "
                "materialise P, or raise max_entries")
        return _dense(self)


def _as_float_array(name: str, x: Any) -> jax.Array:
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    dtype = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a float32 or bfloat16 array, got dtype {dtype}")
    if dtype not in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(x, jnp.float32)  # float16 (and float64 where x64 is off)
    return jnp.asarray(x)


def _check_offset(offset: Any, dim: int) -> int:
    if isinstance(offset, jax.Array):
        raise TypeError("offset must be a Python int (where a leaf sits in P is static), "
                        f"got a jax array {offset!r}")
    return _check_int("offset", offset, 0, dim)  # offset == dim: only for an empty g


def _resolve_backend(proj: Projector) -> str:
    if proj.backend != "auto":
        return proj.backend
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def _compute_dtype(proj: Projector, dtype: Any) -> Any:
    # ±1 is exact in bfloat16: keep bf16 inputs in bf16 (f32 accumulation). A Gaussian tile is
    # generated in float32 and bf16 inputs are upcast, so P itself is never rounded.
    if proj.kind == "rademacher" and dtype == jnp.bfloat16:
        return jnp.bfloat16
    return jnp.float32


def _dot(a: jax.Array, b: jax.Array, dims=((1,), (0,))) -> jax.Array:
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _k_tiles(k: int, block_k: int) -> tuple[int, int]:
    """(number of column tiles, tile width): tiles as even as possible, covering k."""
    n = -(-k // block_k)
    return n, -(-k // n)


# ----------------------------------------------------------------------------------------------
# XLA path
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 2))
def _project(proj: Projector, g_NxD: jax.Array, offset: int) -> jax.Array:
    n, width = g_NxD.shape
    if n == 0 or width == 0:
        return jnp.zeros((n, proj.k), jnp.float32)
    # The 1/√k scale is applied once, to the sum: with integer-valued g and ±1 entries every
    # partial sum is exact, so any split of the work gives bit-identical results.
    if _resolve_backend(proj) == "pallas":
        platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
        out_NxK = _project_pallas(proj, g_NxD, offset, platform=platform)
    else:
        out_NxK = _project_xla(proj, g_NxD, offset)
    return out_NxK * jnp.float32(proj.scale)


def _project_xla(proj: Projector, g_NxD: jax.Array, offset: int) -> jax.Array:
    """Blocked ``g @ P[offset:offset+D_g] · √k`` (unscaled), tiles regenerated from the hash.

    Outer loop over column tiles, inner loop over row blocks: the accumulator of the inner loop
    is one N×block_k tile, written into the output once per column tile.
    """
    n, width = g_NxD.shape
    keys, cdt = proj._keys, _compute_dtype(proj, g_NxD.dtype)
    bd = min(proj.block_d, width)
    n_full, tail = divmod(width, bd)
    n_kt, bk = _k_tiles(proj.k, proj.block_k)

    def rows_product(x_NxB, local_start, n_rows, ck):
        d_lo, d_hi = _row_words(offset, local_start, n_rows)
        tile = _entries(_row_keys(keys, d_lo, d_hi), ck, proj.kind, cdt)
        return _dot(x_NxB.astype(cdt), tile)

    def column_tile(j0):
        ck = _col_keys(keys, _col_range(j0, bk))

        def d_step(b, acc_NxB):
            x_NxB = lax.dynamic_slice_in_dim(g_NxD, b * bd, bd, axis=1)
            return acc_NxB + rows_product(x_NxB, b.astype(jnp.uint32) * _u32(bd), bd, ck)

        acc_NxB = lax.fori_loop(0, n_full, d_step, jnp.zeros((n, bk), jnp.float32))
        if tail:
            acc_NxB = acc_NxB + rows_product(g_NxD[:, n_full * bd:], _u32(n_full * bd), tail, ck)
        return acc_NxB

    if n_kt == 1:
        out_NxK = column_tile(_u32(0))
    else:
        def k_step(t, out_NxK):
            j0 = t * bk
            return lax.dynamic_update_slice_in_dim(
                out_NxK, column_tile(j0.astype(jnp.uint32)), j0, axis=1)

        out_NxK = lax.fori_loop(0, n_kt, k_step, jnp.zeros((n, n_kt * bk), jnp.float32))
    return out_NxK[:, :proj.k]


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _lift(proj: Projector, w_SxK: jax.Array, offset: int, length: int) -> jax.Array:
    s = w_SxK.shape[0]
    if s == 0 or length == 0:
        return jnp.zeros((s, length), jnp.float32)
    w_SxK = w_SxK.astype(jnp.float32)
    if _resolve_backend(proj) == "pallas":
        platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
        return _lift_pallas(proj, w_SxK, offset, length, platform=platform)
    return _lift_xla(proj, w_SxK, offset, length)


def _lift_xla(proj: Projector, w_SxK: jax.Array, offset: int, length: int) -> jax.Array:
    """Blocked ``P[offset:offset+length] @ w`` (S×length), one block of rows at a time."""
    s = w_SxK.shape[0]
    keys = proj._keys
    bd = min(proj.block_d, length)
    n_full, tail = divmod(length, bd)
    n_kt, bk = _k_tiles(proj.k, proj.block_k)
    w_SxKp = jnp.pad(w_SxK, ((0, 0), (0, n_kt * bk - proj.k)))

    def rows(local_start, n_rows):
        d_lo, d_hi = _row_words(offset, local_start, n_rows)
        rk = _row_keys(keys, d_lo, d_hi)

        def k_step(t, acc_SxB):
            j0 = t * bk
            tile = _entries(rk, _col_keys(keys, _col_range(j0.astype(jnp.uint32), bk)),
                            proj.kind, jnp.float32)
            w_t = lax.dynamic_slice_in_dim(w_SxKp, j0, bk, axis=1)
            return acc_SxB + _dot(w_t, tile, ((1,), (1,)))

        acc = jnp.zeros((s, n_rows), jnp.float32)
        if n_kt == 1:
            return k_step(jnp.int32(0), acc)
        return lax.fori_loop(0, n_kt, k_step, acc)

    def d_step(b, out_SxL):
        block = rows(b.astype(jnp.uint32) * _u32(bd), bd)
        return lax.dynamic_update_slice_in_dim(out_SxL, block, b * bd, axis=1)

    out_SxL = jnp.zeros((s, length), jnp.float32)
    out_SxL = lax.fori_loop(0, n_full, d_step, out_SxL)
    if tail:
        out_SxL = out_SxL.at[:, n_full * bd:].set(rows(_u32(n_full * bd), tail))
    return out_SxL * jnp.float32(proj.scale)


@functools.partial(jax.jit, static_argnums=0)
def _gram(proj: Projector) -> jax.Array:
    keys = proj._keys
    ck = _col_keys(keys, _col_range(0, proj.k))
    bd = min(proj.block_d, proj.dim)
    n_full, tail = divmod(proj.dim, bd)

    def block_gram(local_start, n_rows):
        d_lo, d_hi = _row_words(0, local_start, n_rows)
        tile = _entries(_row_keys(keys, d_lo, d_hi), ck, proj.kind, jnp.float32)
        return _dot(tile, tile, ((0,), (0,)))

    acc = lax.fori_loop(0, n_full,
                        lambda b, acc: acc + block_gram(b.astype(jnp.uint32) * _u32(bd), bd),
                        jnp.zeros((proj.k, proj.k), jnp.float32))
    if tail:
        acc = acc + block_gram(_u32(n_full * bd), tail)
    return acc * jnp.float32(proj.scale**2)


@functools.partial(jax.jit, static_argnums=0)
def _dense(proj: Projector) -> jax.Array:
    keys = proj._keys
    d_lo, d_hi = _row_words(0, _u32(0), proj.dim)
    tile = _entries(_row_keys(keys, d_lo, d_hi), _col_keys(keys, _col_range(0, proj.k)),
                    proj.kind, jnp.float32)
    return tile * jnp.float32(proj.scale)


# ----------------------------------------------------------------------------------------------
# Pallas path
# ----------------------------------------------------------------------------------------------


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _interpret() -> bool:
    return jax.default_backend() not in ("gpu", "tpu")


def _project_kernel_gpu(g_ref, o_ref, *, proj, offset, n_rows, n_blocks, per_split, tn, td, tk,
                        cdt):
    """One (tn, tk) partial output tile over one split of the D blocks.

    Triton programs run in parallel, so D cannot be a grid reduction axis; instead each program
    loops over ``per_split`` consecutive D blocks (split-K) and writes its own partial tile,
    summed afterwards by XLA. The split keeps the GPU busy when N·k alone gives few tiles.
    """
    from jax.experimental.pallas import triton as plgpu

    keys = proj._keys
    i, jt, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows_ok = (i * tn + lax.iota(jnp.int32, tn))[:, None] < n_rows
    ck = _col_keys(keys, _col_range((jt * tk).astype(jnp.uint32), tk))

    def d_step(b, acc):
        x = plgpu.load(g_ref.at[pl.ds(i * tn, tn), pl.ds(b * td, td)], mask=rows_ok, other=0.0)
        d_lo, d_hi = _row_words(offset, (b * td).astype(jnp.uint32), td)
        tile = _entries(_row_keys(keys, d_lo, d_hi), ck, proj.kind, cdt)
        return acc + _dot(x.astype(cdt), tile)

    first = sp * per_split
    last = jnp.minimum(first + per_split, n_blocks)
    o_ref[...] = lax.fori_loop(first, last, d_step, jnp.zeros((tn, tk), jnp.float32))


def _project_kernel_tpu(g_ref, o_ref, *, proj, offset, td, tk, cdt):
    """Grid (N tiles, k tiles, D blocks): D is the sequential reduction axis (TPU grids run in
    order), accumulating into the output block that stays resident across it."""
    keys = proj._keys
    jt, b = pl.program_id(1), pl.program_id(2)

    @pl.when(b == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    ck = _col_keys(keys, _col_range((jt * tk).astype(jnp.uint32), tk))
    d_lo, d_hi = _row_words(offset, (b * td).astype(jnp.uint32), td)
    tile = _entries(_row_keys(keys, d_lo, d_hi), ck, proj.kind, cdt)
    o_ref[...] += _dot(g_ref[...].astype(cdt), tile)


def _project_pallas(proj: Projector, g_NxD: jax.Array, offset: int, *,
                    platform: str) -> jax.Array:
    """Pallas ``g @ P[offset:offset+D_g] · √k`` (unscaled); the rows past the last whole kernel
    block go through the XLA path."""
    n, width = g_NxD.shape
    cdt = _compute_dtype(proj, g_NxD.dtype)
    interpret = _interpret()
    if platform == "gpu":
        tn, td = min(_GPU_TILE_N, max(16, _next_pow2(n))), _GPU_TILE_D
        tk = _GPU_TILE_K if proj.k > 64 else max(16, _next_pow2(proj.k))
    elif platform == "tpu":
        tn, td = (n if n <= _TPU_TILE_N else _TPU_TILE_N), _TPU_TILE_D
        tk = _TPU_TILE_K if proj.k > 128 else 128
    else:
        raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
    n_blocks = width // td
    if n_blocks == 0:
        return _project_xla(proj, g_NxD, offset)
    n_tiles, k_pad = -(-n // tn), -(-proj.k // tk) * tk
    if platform == "gpu":
        from jax.experimental.pallas import triton as plgpu

        tiles = n_tiles * (k_pad // tk)
        per_split = -(-n_blocks // max(1, min(n_blocks, -(-_GPU_PROGRAMS // tiles))))
        n_split = -(-n_blocks // per_split)
        kernel = functools.partial(_project_kernel_gpu, proj=proj, offset=offset, n_rows=n,
                                   n_blocks=n_blocks, per_split=per_split, tn=tn, td=td, tk=tk,
                                   cdt=cdt)
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((n_split, n_tiles * tn, k_pad), jnp.float32),
            grid=(n_tiles, k_pad // tk, n_split),
            out_specs=pl.BlockSpec((None, tn, tk), lambda i, j, sp: (sp, i, j)),
            compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4,
                                                                        num_stages=2),
            interpret=interpret,
            name="jaxgrad_project",
        )(g_NxD).sum(axis=0)
    else:
        from jax.experimental.pallas import tpu as pltpu

        kernel = functools.partial(_project_kernel_tpu, proj=proj, offset=offset, td=td, tk=tk,
                                   cdt=cdt)
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((n, k_pad), jnp.float32),
            grid=(n_tiles, k_pad // tk, n_blocks),
            in_specs=[pl.BlockSpec((tn, td), lambda i, j, b: (i, b))],
            out_specs=pl.BlockSpec((tn, tk), lambda i, j, b: (i, j)),
            compiler_params=None if interpret else pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret,
            name="jaxgrad_project",
        )(g_NxD)
    out = out[:n, :proj.k]
    done = n_blocks * td
    if done < width:
        out = out + _project_xla(proj, g_NxD[:, done:], offset + done)
    return out


def _lift_tile(w_ref, *, proj, offset, n_kt, tl, tk):
    """The (ts, tl) tile ``w @ P[rows of block program_id(1)]ᵀ``, looping over k tiles."""
    keys = proj._keys
    b = pl.program_id(1)
    d_lo, d_hi = _row_words(offset, (b * tl).astype(jnp.uint32), tl)
    rk = _row_keys(keys, d_lo, d_hi)

    def k_step(t, acc):
        w_t = w_ref[:, pl.ds(t * tk, tk)]
        tile = _entries(rk, _col_keys(keys, _col_range((t * tk).astype(jnp.uint32), tk)),
                        proj.kind, jnp.float32)
        return acc + _dot(w_t, tile, ((1,), (1,)))

    acc = lax.fori_loop(0, n_kt, k_step, jnp.zeros((w_ref.shape[0], tl), jnp.float32))
    return acc * jnp.float32(proj.scale)


def _lift_kernel_gpu(w_ref, o_ref, *, n_rows, length, ts, tl, **tile_args):
    """Triton: the output is the whole S×length array; edge tiles are stored with a mask (no
    padded S×D copy)."""
    from jax.experimental.pallas import triton as plgpu

    i, b = pl.program_id(0), pl.program_id(1)
    ok = (((i * ts + lax.iota(jnp.int32, ts)) < n_rows)[:, None]
          & ((b * tl + lax.iota(jnp.int32, tl)) < length)[None, :])
    out = _lift_tile(w_ref, tl=tl, **tile_args)
    plgpu.store(o_ref.at[pl.ds(i * ts, ts), pl.ds(b * tl, tl)], out, mask=ok)


def _lift_kernel_tpu(w_ref, o_ref, *, tl, **tile_args):
    """Mosaic: blocked output; the edge blocks are clipped by the pipeline."""
    o_ref[...] = _lift_tile(w_ref, tl=tl, **tile_args)


def _lift_pallas(proj: Projector, w_SxK: jax.Array, offset: int, length: int, *,
                 platform: str) -> jax.Array:
    """Pallas ``P[offset:offset+length] @ w``: grid over (S tiles, row blocks), both parallel;
    the output is exactly S×length (only the small w is padded)."""
    s = w_SxK.shape[0]
    interpret = _interpret()
    if platform == "gpu":
        ts, tl = min(_GPU_TILE_S, max(16, _next_pow2(s))), _GPU_TILE_L
        tk = _GPU_TILE_K if proj.k > 64 else max(16, _next_pow2(proj.k))
    elif platform == "tpu":
        ts, tl = (s if s <= _TPU_TILE_S else _TPU_TILE_S), _TPU_TILE_L
        tk = _TPU_TILE_K if proj.k > 128 else 128
    else:
        raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
    n_kt = -(-proj.k // tk)
    n_s, n_l = -(-s // ts), -(-length // tl)
    w_pad = jnp.pad(w_SxK, ((0, n_s * ts - s), (0, n_kt * tk - proj.k)))
    tile_args = dict(proj=proj, offset=offset, n_kt=n_kt, tk=tk)
    common = dict(out_shape=jax.ShapeDtypeStruct((s, length), jnp.float32), grid=(n_s, n_l),
                  in_specs=[pl.BlockSpec((ts, n_kt * tk), lambda i, b: (i, 0))],
                  interpret=interpret, name="jaxgrad_lift")
    if platform == "gpu":
        from jax.experimental.pallas import triton as plgpu

        kernel = functools.partial(_lift_kernel_gpu, n_rows=s, length=length, ts=ts, tl=tl,
                                   **tile_args)
        return pl.pallas_call(
            kernel,
            compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4,
                                                                        num_stages=2),
            **common)(w_pad)
    from jax.experimental.pallas import tpu as pltpu

    kernel = functools.partial(_lift_kernel_tpu, tl=tl, **tile_args)
    return pl.pallas_call(
        kernel,
        out_specs=pl.BlockSpec((ts, tl), lambda i, b: (i, b)),
        compiler_params=None if interpret else pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel")),
        **common)(w_pad)
