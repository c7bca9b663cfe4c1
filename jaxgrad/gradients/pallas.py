"""Pallas kernels of the projection (GPU: Triton; TPU: Mosaic). They generate the tiles of P
in-kernel with the hash of :mod:`jaxgrad.gradients.prng` and multiply them on the tensor cores /
MXU; rows of D that do not fill a whole kernel block go through the XLA path
(:mod:`jaxgrad.gradients.xla`, same entries). :mod:`jaxgrad.gradients.projection` describes the
grids. On CPU they run only in interpret mode (chosen automatically), so tests can check them
against the XLA path.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxgrad.gradients.prng import _col_keys, _col_range, _entries, _row_keys, _row_words
from jaxgrad.gradients.xla import _compute_dtype, _dot, _project_xla

if TYPE_CHECKING:
    from jaxgrad.gradients.projection import Projector

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


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _interpret() -> bool:
    return jax.default_backend() not in ("gpu", "tpu")


def _tiles(platform: str, rows: int, k: int, *, lift: bool) -> tuple[int, int, int]:
    """The kernel's tiles ``(rows, D, k)`` on ``platform``: rows of g (project) or of w (lift),
    at most a tile's worth; a D block (project) or a block of rows of P (lift); columns of P."""
    if platform == "gpu":
        most, td = (_GPU_TILE_S, _GPU_TILE_L) if lift else (_GPU_TILE_N, _GPU_TILE_D)
        tk = _GPU_TILE_K if k > 64 else max(16, _next_pow2(k))
        return min(most, max(16, _next_pow2(rows))), td, tk
    if platform == "tpu":
        most, td = (_TPU_TILE_S, _TPU_TILE_L) if lift else (_TPU_TILE_N, _TPU_TILE_D)
        tk = _TPU_TILE_K if k > 128 else 128
        return (rows if rows <= most else most), td, tk
    raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")


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
    tn, td, tk = _tiles(platform, n, proj.k, lift=False)
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
    ts, tl, tk = _tiles(platform, s, proj.k, lift=True)
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
