"""Blockwise ``attend`` in plain XLA: online softmax over key blocks, masked blocks skipped.

Same contract as ``reference.attend`` but never materialises the ``[Tq, Tk]`` scores: queries are
cut into blocks of ``block_q`` rows, keys into blocks of ``block_k``; for each query block a loop
over key blocks keeps float32 running statistics (max, sum, weighted values). A key block that the
per-block bounds of positions and segment ids prove invisible to the whole query block is skipped
with ``lax.cond``, so causal attention costs about half of full attention, and a ring step against
a block that lies entirely in the future costs almost nothing. This is the fast path on CPU, and
the portable fallback everywhere.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from cpjax.attention.masks import (
    BlockBounds,
    block_bounds,
    check_attend_inputs,
    fully_visible,
    may_overlap,
    visibility_mask,
)
from cpjax.attention.padding import pad_kv_rows, pad_query_rows

#: Default blocks: large enough to amortise the loop on CPU, multiples of the 64-row tile.
BLOCK_Q = 256
BLOCK_K = 512


def block_sizes(tq: int, tk: int, block_q: int, block_k: int) -> tuple[int, int]:
    """The blocks :func:`attend` uses for ``Tq`` queries and ``Tk`` keys: the requested sizes
    clipped to the lengths (one block covers a short input)."""
    return min(block_q, max(tq, 1)), min(block_k, max(tk, 1))


def attend(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    *,
    window: Optional[int] = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
):
    """Masked GQA attention by blocks; see ``reference.attend`` for shapes and semantics.

    Args:
      q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]``; positions and segments ``[Tq]`` / ``[Tk]`` int32.
      window: optional sliding window.
      block_q, block_k: block sizes (any >= 1; clipped to the lengths, see
        :func:`block_sizes`).

    Returns:
      ``(out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32)``.
    """
    check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    block_q, block_k = block_sizes(tq, tk, block_q, block_k)
    scale = 1.0 / float(d) ** 0.5

    qp, q_pos_p, q_seg_p = pad_query_rows(q, q_pos, q_seg, block_q)
    kp, vp, kv_pos_p, kv_seg_p = pad_kv_rows(k, v, kv_pos, kv_seg, block_k)
    n_q, n_k = qp.shape[0] // block_q, kp.shape[0] // block_k

    # GEMM-friendly layouts: [block, Hkv, G*bq | bk, D]; row r of a query block is (g, q).
    q_blocks = (
        qp.reshape(n_q, block_q, hkv, group, d)
        .transpose(0, 2, 3, 1, 4)
        .reshape(n_q, hkv, group * block_q, d)
    )
    k_blocks = kp.reshape(n_k, block_k, hkv, d).transpose(0, 2, 1, 3)
    v_blocks = vp.reshape(n_k, block_k, hkv, d).transpose(0, 2, 1, 3)
    kv_pos_blocks = kv_pos_p.reshape(n_k, block_k)
    kv_seg_blocks = kv_seg_p.reshape(n_k, block_k)
    q_bounds = block_bounds(q_pos_p, q_seg_p, block_q)
    kv_bounds = block_bounds(kv_pos_p, kv_seg_p, block_k)

    def one_query_block(i):
        qb = q_blocks[i].astype(jnp.float32) * scale  # [Hkv, G*bq, D]
        qb_pos = jax.lax.dynamic_slice_in_dim(q_pos_p, i * block_q, block_q)
        qb_seg = jax.lax.dynamic_slice_in_dim(q_seg_p, i * block_q, block_q)
        qb_bounds = BlockBounds(*(b[i] for b in q_bounds))

        def update(j, carry, masked: bool):
            m, l, acc = carry  # [Hkv, G*bq] x2, [.., D]
            s = jnp.einsum("hrd,hkd->hrk", qb, k_blocks[j].astype(jnp.float32))
            if masked:
                mask = visibility_mask(
                    qb_pos, kv_pos_blocks[j], qb_seg, kv_seg_blocks[j], window
                )  # [bq, bk]
                s = jnp.where(jnp.tile(mask, (group, 1))[None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l_new = alpha * l + p.sum(axis=-1)
            acc_new = alpha[..., None] * acc + jnp.einsum(
                "hrk,hkd->hrd", p, v_blocks[j].astype(jnp.float32)
            )
            return m_new, l_new, acc_new

        def maybe_update(j, carry):
            kvb_bounds = BlockBounds(*(b[j] for b in kv_bounds))
            visible = may_overlap(qb_bounds, kvb_bounds, window)
            full = fully_visible(qb_bounds, kvb_bounds, window)
            branch = jnp.where(visible, jnp.where(full, 2, 1), 0)
            return jax.lax.switch(
                branch,
                [
                    lambda _, c: c,
                    functools.partial(update, masked=True),
                    functools.partial(update, masked=False),
                ],
                j,
                carry,
            )

        rows = group * block_q
        init = (
            jnp.full((hkv, rows), -jnp.inf, jnp.float32),
            jnp.zeros((hkv, rows), jnp.float32),
            jnp.zeros((hkv, rows, d), jnp.float32),
        )
        m, l, acc = jax.lax.fori_loop(0, n_k, maybe_update, init)
        seen = l != 0  # NaN counts as seen: a NaN input must surface, not vanish
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        out = out.reshape(hkv, group, block_q, d).transpose(2, 0, 1, 3).reshape(block_q, hq, d)
        lse = lse.reshape(hkv, group, block_q).transpose(2, 0, 1).reshape(block_q, hq)
        return out, lse

    out, lse = jax.lax.map(one_query_block, jnp.arange(n_q))
    out = out.reshape(n_q * block_q, hq, d)[:tq].astype(q.dtype)
    lse = lse.reshape(n_q * block_q, hq)[:tq]
    return out, lse
