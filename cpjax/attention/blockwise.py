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
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from cpjax.attention.reference import visibility_mask

_BIG = jnp.iinfo(jnp.int32).max


def pad_rows(x, multiple: int, value):
    """Pad axis 0 of ``x`` up to a multiple of ``multiple`` with ``value``."""
    x = jnp.asarray(x)
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


def pad_kv_rows(k, v, kv_pos, kv_seg, multiple: int):
    """Keys/values with their int32 positions and segments padded to a multiple of rows;
    padding rows carry segment -1 (invisible)."""
    return (pad_rows(k, multiple, 0), pad_rows(v, multiple, 0),
            pad_rows(kv_pos.astype(jnp.int32), multiple, 0),
            pad_rows(kv_seg.astype(jnp.int32), multiple, -1))


def pad_query_rows(q, q_pos, q_seg, multiple: int):
    """Queries with their int32 positions and segments padded to a multiple of rows; padding
    rows carry segment -1 (they see nothing)."""
    return (pad_rows(q, multiple, 0), pad_rows(q_pos.astype(jnp.int32), multiple, 0),
            pad_rows(q_seg.astype(jnp.int32), multiple, -1))


class BlockBounds(NamedTuple):
    """Per-block summaries of positions and segments over the real (``seg >= 0``) rows.

    An all-padding block gets empty ranges (min > max) so it overlaps nothing.
    """

    min_pos: jax.Array
    max_pos: jax.Array
    min_seg: jax.Array
    max_seg: jax.Array
    all_real: jax.Array   # no padding row in the block


def _block_bounds(pos, seg, block: int) -> BlockBounds:
    """``BlockBounds`` of each consecutive ``block`` rows of ``pos, seg [T]``."""
    pos = pos.reshape(-1, block)
    seg = seg.reshape(-1, block)
    real = seg >= 0
    return BlockBounds(min_pos=jnp.where(real, pos, _BIG).min(axis=1),
                       max_pos=jnp.where(real, pos, -_BIG).max(axis=1),
                       min_seg=jnp.where(real, seg, _BIG).min(axis=1),
                       max_seg=jnp.where(real, seg, -1).max(axis=1),
                       all_real=real.all(axis=1))


def _may_overlap(q: BlockBounds, kv: BlockBounds, window: Optional[int]):
    """Whether some query of the block may see some key of the block (conservative)."""
    ok = (kv.min_pos <= q.max_pos) & (kv.min_seg <= q.max_seg) & (q.min_seg <= kv.max_seg)
    if window is not None:
        ok &= (q.min_pos - kv.max_pos) < window
    return ok


def _fully_visible(q: BlockBounds, kv: BlockBounds, window: Optional[int]):
    """Whether every query of the block sees every key of the block (no mask needed).

    True only when both blocks are free of padding and hold one and the same segment, and every
    key position is at or before every query position (and inside the window).
    """
    ok = (q.all_real & kv.all_real & (q.min_seg == q.max_seg) & (kv.min_seg == kv.max_seg)
          & (q.min_seg == kv.min_seg) & (kv.max_pos <= q.min_pos))
    if window is not None:
        ok &= (q.max_pos - kv.min_pos) < window
    return ok


def visible_block_schedule(q_pos, q_seg, kv_pos, kv_seg, block_q: int, block_k: int,
                           window: Optional[int] = None):
    """For each query block, the key blocks that some of its queries may see.

    Args:
      q_pos, q_seg: ``[Tq]`` int32 with ``Tq % block_q == 0`` (padding rows: segment -1).
      kv_pos, kv_seg: ``[Tk]`` int32 with ``Tk % block_k == 0``.

    Returns:
      ``(blocks [n_q, n_k] int32, counts [n_q] int32)``: row ``i`` of ``blocks`` lists the key
      blocks query block ``i`` may see in increasing order, then the others; ``counts[i]`` is how
      many it may see. A kernel that visits ``blocks[i, :counts[i]]`` neither loads nor computes
      a block the positions prove invisible (the same conservative test as :func:`attend`).
    """
    q_bounds = _block_bounds(q_pos, q_seg, block_q)
    kv_bounds = _block_bounds(kv_pos, kv_seg, block_k)
    visible = _may_overlap(BlockBounds(*(b[:, None] for b in q_bounds)),
                           BlockBounds(*(b[None, :] for b in kv_bounds)), window)
    blocks = jnp.argsort(~visible, axis=1, stable=True).astype(jnp.int32)
    return blocks, visible.sum(axis=1, dtype=jnp.int32)


def attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window: Optional[int] = None,
           block_q: int = 256, block_k: int = 512):
    """Masked GQA attention by blocks; see ``reference.attend`` for shapes and semantics.

    Args:
      q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]``; positions and segments ``[Tq]`` / ``[Tk]`` int32.
      window: optional sliding window.
      block_q, block_k: block sizes (clipped to the padded lengths).

    Returns:
      ``(out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32)``.
    """
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    block_q = min(block_q, max(tq, 1))
    block_k = min(block_k, max(tk, 1))
    scale = 1.0 / float(d) ** 0.5

    qp, q_pos_p, q_seg_p = pad_query_rows(q, q_pos, q_seg, block_q)
    kp, vp, kv_pos_p, kv_seg_p = pad_kv_rows(k, v, kv_pos, kv_seg, block_k)
    n_q, n_k = qp.shape[0] // block_q, kp.shape[0] // block_k

    # GEMM-friendly layouts: [block, Hkv, G*bq | bk, D]; row r of a query block is (g, q).
    q_blocks = (qp.reshape(n_q, block_q, hkv, group, d).transpose(0, 2, 3, 1, 4)
                .reshape(n_q, hkv, group * block_q, d))
    k_blocks = kp.reshape(n_k, block_k, hkv, d).transpose(0, 2, 1, 3)
    v_blocks = vp.reshape(n_k, block_k, hkv, d).transpose(0, 2, 1, 3)
    kv_pos_blocks = kv_pos_p.reshape(n_k, block_k)
    kv_seg_blocks = kv_seg_p.reshape(n_k, block_k)
    q_bounds = _block_bounds(q_pos_p, q_seg_p, block_q)
    kv_bounds = _block_bounds(kv_pos_p, kv_seg_p, block_k)

    def one_query_block(i):
        qb = q_blocks[i].astype(jnp.float32) * scale            # [Hkv, G*bq, D]
        qb_pos = jax.lax.dynamic_slice_in_dim(q_pos_p, i * block_q, block_q)
        qb_seg = jax.lax.dynamic_slice_in_dim(q_seg_p, i * block_q, block_q)
        qb_bounds = BlockBounds(*(b[i] for b in q_bounds))

        def update(j, carry, masked: bool):
            m, l, acc = carry                                    # [Hkv, G*bq] x2, [.., D]
            s = jnp.einsum("hrd,hkd->hrk", qb, k_blocks[j].astype(jnp.float32))
            if masked:
                mask = visibility_mask(qb_pos, kv_pos_blocks[j], qb_seg, kv_seg_blocks[j],
                                       window)                   # [bq, bk]
                s = jnp.where(jnp.tile(mask, (group, 1))[None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l_new = alpha * l + p.sum(axis=-1)
            acc_new = alpha[..., None] * acc + jnp.einsum(
                "hrk,hkd->hrd", p, v_blocks[j].astype(jnp.float32))
            return m_new, l_new, acc_new

        def maybe_update(j, carry):
            kvb_bounds = BlockBounds(*(b[j] for b in kv_bounds))
            visible = _may_overlap(qb_bounds, kvb_bounds, window)
            full = _fully_visible(qb_bounds, kvb_bounds, window)
            branch = jnp.where(visible, jnp.where(full, 2, 1), 0)
            return jax.lax.switch(branch, [
                lambda _, c: c,
                functools.partial(update, masked=True),
                functools.partial(update, masked=False)], j, carry)

        rows = group * block_q
        init = (jnp.full((hkv, rows), -jnp.inf, jnp.float32),
                jnp.zeros((hkv, rows), jnp.float32),
                jnp.zeros((hkv, rows, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, n_k, maybe_update, init)
        seen = l != 0      # NaN counts as seen: a NaN input must surface, not vanish
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        out = out.reshape(hkv, group, block_q, d).transpose(2, 0, 1, 3).reshape(block_q, hq, d)
        lse = lse.reshape(hkv, group, block_q).transpose(2, 0, 1).reshape(block_q, hq)
        return out, lse

    out, lse = jax.lax.map(one_query_block, jnp.arange(n_q))
    out = out.reshape(n_q * block_q, hq, d)[:tq].astype(q.dtype)
    lse = lse.reshape(n_q * block_q, hq)[:tq]
    return out, lse
