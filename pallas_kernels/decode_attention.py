"""Split-K decode attention: a few new queries against a long KV cache, in one Pallas kernel.

The cache is cut into ``n_splits`` chunks processed by parallel programs (grid
``(KV heads, splits)``); each program runs the flash-attention loop of
``pallas_kernels.flash_attention`` over its chunk for all ``G * Tq`` query rows that share one
KV head (the G query heads of a KV head reuse each K/V tile they load), and writes a partial
``(out, lse)``. The partials are merged by log-sum-exp (``cpjax.attention.merge``). Empty cache
slots carry segment ``PAD_SEGMENT``; key blocks the positions prove invisible are skipped (the
flash kernel's ``masks.may_overlap`` test). Arguments in the ``attend`` order:
``decode_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg)``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cpjax.attention.masks import PAD_SEGMENT, check_attend_inputs
from cpjax.attention.merge import merge_stacked
from cpjax.attention.padding import pad_kv_rows
from pallas_kernels.flash_attention import _flash_kernel, default_interpret

_MIN_ROWS = 16  # Triton dots need at least 16 rows


@functools.partial(
    jax.jit,
    static_argnames=("n_splits", "block_k", "window", "interpret", "num_warps", "num_stages"),
)
def decode_attention(
    q,
    k_cache,
    v_cache,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    *,
    n_splits: int = 16,
    block_k: int = 128,
    window: Optional[int] = None,
    interpret: Optional[bool] = None,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """Attention of ``q [Tq, Hq, D]`` (Tq small) over a cache ``k_cache, v_cache [Tk, Hkv, D]``.

    Args:
      q_pos, q_seg: ``[Tq]`` int32 positions / segments of the new tokens.
      kv_pos, kv_seg: ``[Tk]`` int32 positions / segments of the cache slots (negative = empty).
      n_splits: cache chunks computed in parallel (reduced if the cache is short).
      block_k: K/V tile inside a chunk.

    Returns:
      ``(out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32)``.
    """
    check_attend_inputs(q, k_cache, v_cache, q_pos, kv_pos, q_seg, kv_seg)
    if interpret is None:
        interpret = default_interpret()
    tq, hq, d = q.shape
    tk, hkv, _ = k_cache.shape
    group = hq // hkv
    n_splits = max(1, min(n_splits, -(-tk // block_k)))
    chunk = -(-tk // (n_splits * block_k)) * block_k
    kp, vp, kv_pos_p, kv_seg_p = pad_kv_rows(k_cache, v_cache, kv_pos, kv_seg, chunk * n_splits)

    # Rows of one KV head: (g, t) for its G query heads and Tq tokens.
    rows = group * tq
    rows_p = max(_MIN_ROWS, 1 << (rows - 1).bit_length())
    q_rows = q.reshape(tq, hkv, group, d).transpose(1, 2, 0, 3).reshape(hkv, rows, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, rows_p - rows), (0, 0)))
    row_pos = jnp.pad(jnp.tile(q_pos.astype(jnp.int32), group), (0, rows_p - rows))
    row_seg = jnp.pad(
        jnp.tile(q_seg.astype(jnp.int32), group), (0, rows_p - rows), constant_values=PAD_SEGMENT
    )

    kernel = functools.partial(
        _flash_kernel,
        block_k=block_k,
        n_k=chunk // block_k,
        scale=1.0 / math.sqrt(d),
        window=window,
    )
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    part_out, part_lse = pl.pallas_call(
        kernel,
        grid=(hkv, n_splits),
        in_specs=[
            pl.BlockSpec((None, rows_p, d), lambda h, s: (h, 0, 0)),
            pl.BlockSpec((chunk, None, d), lambda h, s: (s, h, 0)),
            pl.BlockSpec((chunk, None, d), lambda h, s: (s, h, 0)),
            pl.BlockSpec((rows_p,), lambda h, s: (0,)),
            pl.BlockSpec((rows_p,), lambda h, s: (0,)),
            pl.BlockSpec((chunk,), lambda h, s: (s,)),
            pl.BlockSpec((chunk,), lambda h, s: (s,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows_p, d), lambda h, s: (s, h, 0, 0)),
            pl.BlockSpec((None, None, rows_p), lambda h, s: (s, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((n_splits, hkv, rows_p, d), jnp.float32),
            jax.ShapeDtypeStruct((n_splits, hkv, rows_p), jnp.float32),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="cpjax_decode_attention",
    )(q_rows, kp, vp, row_pos, row_seg, kv_pos_p, kv_seg_p)
    out, lse = merge_stacked(part_out, part_lse)  # [Hkv, rows_p, D], [Hkv, rows_p]
    out = out[:, :rows].reshape(hkv, group, tq, d).transpose(2, 0, 1, 3).reshape(tq, hq, d)
    lse = lse[:, :rows].reshape(hkv, group, tq).transpose(2, 0, 1).reshape(tq, hq)
    return out.astype(q.dtype), lse
