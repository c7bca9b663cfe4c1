"""Counter-based random projection: ``Pᵀg`` and ``P w`` without ever holding the D×k matrix P.

GradEx stores ``x_i = Pᵀ g_i`` for every training sample, with g_i the D-vector of LoRA
gradients (D up to ~10^8) and P a D×k random matrix (k = 100…8192) with entries ±1/√k
(Rademacher) or N(0, 1/k) (Gaussian). Materialising P costs D·k numbers (the reference code kept
7.5 GB of float64). Here P is never stored: entry ``P[d, j]`` is a pure function of
``(seed, d, j)`` computed by an integer hash, so any tile of P can be regenerated on the fly, on
any device, in any order. The entries are bit-identical however the work is split (device type,
device count, chunking of samples or of D, block sizes, XLA or Pallas); results then differ only
by the order of float32 summation.

The hash and why it is well mixed are described in :mod:`jaxgrad.gradients.prng`; the modules of
the projection are ``prng`` (the hash), ``xla`` (the XLA path), ``pallas`` (the Pallas kernels)
and this one (the :class:`Projector`, its argument checks and the choice of path).

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

Pallas kernels (GPU and TPU) generate the tiles in-kernel with the same hash code (the jnp
functions of ``prng`` are used by both paths) and multiply them on the tensor cores / MXU:

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

from jaxgrad.config import PROJECTION_KINDS
from jaxgrad.gradients.pallas import _lift_pallas, _project_pallas
from jaxgrad.gradients.prng import _Keys, _seed_keys
from jaxgrad.gradients.xla import _dense, _gram, _lift_xla, _project_xla

_BACKENDS = ("auto", "xla", "pallas")
_MAX_DIM = 2**63
_MAX_K = 2**20
_MAX_WIDTH = 2**31 - 1  # widest g (or lift length) in one call: int32 array indexing
_DEFAULT_MAX_DENSE = 2**24


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
