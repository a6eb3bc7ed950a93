"""Pallas flash attention that returns the log-sum-exp, with masks from positions and segments.

``flash_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)`` has the contract of
``cpjax.attention.reference.attend`` (DESIGN.md): key j is visible to query i iff
``kv_seg[j] == q_seg[i] >= 0`` and ``kv_pos[j] <= q_pos[i]`` (and inside an optional window).

Kernel structure (Pallas GPU / Triton lowering; ``interpret=True`` runs it on CPU):

* grid ``(query blocks, query heads)``; the program of query head ``h`` reads K/V head
  ``h // G`` (GQA without repeating K/V in memory: the G programs of one KV head read the same
  K/V tiles, which the L2 cache shares);
* a loop over K/V blocks keeps float32 online-softmax statistics in base 2;
* the mask of a loaded block is ``cpjax.attention.masks.visibility_mask``; a K/V block is
  skipped (``lax.cond``) when ``masks.may_overlap`` on the bounds of its positions and segments
  proves it invisible to the whole query block, so causal attention costs about half of full
  attention and a ring step against a block that lies entirely in the future costs almost
  nothing;
* rows that see no key return ``out = 0`` and ``lse = -inf`` (no NaN); ``lse`` is natural-log.

Any ``Tq``, ``Tk`` (padded internally with segment ``PAD_SEGMENT``), fp32 or bf16 inputs.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from cpjax.attention.masks import bounds, check_attend_inputs, may_overlap, visibility_mask
from cpjax.attention.padding import pad_kv_rows, pad_query_rows

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: keeps exp2 differences NaN-free
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def default_interpret() -> bool:
    """Interpret mode unless the default backend is a GPU."""
    return jax.default_backend() != "gpu"


def _flash_kernel(
    q_ref,
    k_ref,
    v_ref,
    q_pos_ref,
    q_seg_ref,
    kv_pos_ref,
    kv_seg_ref,
    o_ref,
    lse_ref,
    *,
    block_k: int,
    n_k: int,
    scale: float,
    window: Optional[int],
):
    q = q_ref[...]  # [bq, D]
    q_pos = q_pos_ref[...]
    q_seg = q_seg_ref[...]
    q_bounds = bounds(q_pos, q_seg)
    block_q, d = q.shape

    def visit(j, carry):
        acc, m, l = carry
        span = pl.ds(j * block_k, block_k)
        k = k_ref[span, :]
        v = v_ref[span, :]
        kv_pos = kv_pos_ref[span]
        kv_seg = kv_seg_ref[span]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * (scale * _LOG2E)
        mask = visibility_mask(q_pos, kv_pos, q_seg, kv_seg, window)
        s = jnp.where(mask, s, _MASKED)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_next)
        p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = correction * l + jnp.sum(p, axis=1)
        acc_next = correction[:, None] * acc + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return acc_next, m_next, l_next

    def maybe_visit(j, carry):
        span = pl.ds(j * block_k, block_k)
        visible = may_overlap(q_bounds, bounds(kv_pos_ref[span], kv_seg_ref[span]), window)
        return lax.cond(visible, lambda c: visit(j, c), lambda c: c, carry)

    init = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), _MASKED, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, n_k, maybe_visit, init)
    seen = l != 0  # NaN counts as seen: a NaN input must surface, not vanish
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(safe_l)) * _LN2, -jnp.inf)


@functools.partial(
    jax.jit,
    static_argnames=("block_q", "block_k", "window", "interpret", "num_warps", "num_stages"),
)
def flash_attention(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    *,
    block_q: int = 64,
    block_k: int = 64,
    window: Optional[int] = None,
    interpret: Optional[bool] = None,
    num_warps: Optional[int] = None,
    num_stages: int = 2,
):
    """Blockwise masked GQA attention in one Pallas kernel.

    Args:
      q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]`` with ``Hq % Hkv == 0``.
      q_pos, kv_pos: ``[Tq]``, ``[Tk]`` int32 global positions.
      q_seg, kv_seg: ``[Tq]``, ``[Tk]`` int32 segment ids (negative = padding).
      block_q, block_k: tile sizes (powers of two, >= 16 on GPU).
      window: optional sliding window.
      interpret: run the kernel in the Pallas interpreter (default: unless on a GPU).

    Returns:
      ``(out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32 natural-log)``.
    """
    check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    if interpret is None:
        interpret = default_interpret()
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    qp, q_pos_p, q_seg_p = pad_query_rows(q, q_pos, q_seg, block_q)
    kp, vp, kv_pos_p, kv_seg_p = pad_kv_rows(k, v, kv_pos, kv_seg, block_k)
    tq_p, tk_p = qp.shape[0], kp.shape[0]

    kernel = functools.partial(
        _flash_kernel, block_k=block_k, n_k=tk_p // block_k, scale=1.0 / math.sqrt(d), window=window
    )
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(
            num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages
        )
    out, lse = pl.pallas_call(
        kernel,
        grid=(tq_p // block_q, hq),
        in_specs=[
            pl.BlockSpec((block_q, None, d), lambda i, h: (i, h, 0)),
            pl.BlockSpec((tk_p, None, d), lambda i, h: (0, h // group, 0)),
            pl.BlockSpec((tk_p, None, d), lambda i, h: (0, h // group, 0)),
            pl.BlockSpec((block_q,), lambda i, h: (i,)),
            pl.BlockSpec((block_q,), lambda i, h: (i,)),
            pl.BlockSpec((tk_p,), lambda i, h: (0,)),
            pl.BlockSpec((tk_p,), lambda i, h: (0,)),
        ],
        out_specs=[
            pl.BlockSpec((block_q, None, d), lambda i, h: (i, h, 0)),
            pl.BlockSpec((None, block_q), lambda i, h: (h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((tq_p, hq, d), q.dtype),
            jax.ShapeDtypeStruct((hq, tq_p), jnp.float32),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="cpjax_flash_attention",
    )(qp, kp, vp, q_pos_p, q_seg_p, kv_pos_p, kv_seg_p)
    return out[:tq], lse.T[:tq]
