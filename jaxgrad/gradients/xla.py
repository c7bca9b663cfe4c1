"""The XLA path of the projection: blocked products of g or w with tiles of P regenerated from the
hash (:mod:`jaxgrad.gradients.prng`), plus ``PᵀP`` and the dense P for small sizes.

Memory is O(N·k + block_d·block_k) whatever D·k is; see :mod:`jaxgrad.gradients.projection` for
the layout of the computation. The Pallas kernels (:mod:`jaxgrad.gradients.pallas`) share
``_compute_dtype`` and ``_dot`` and send the rows past their last whole block here.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxgrad.gradients.prng import _col_keys, _col_range, _entries, _row_keys, _row_words, _u32

if TYPE_CHECKING:
    from jaxgrad.gradients.projection import Projector


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
