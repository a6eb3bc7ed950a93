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

from typing import Optional

import jax
import jax.numpy as jnp

from cpjax.attention.reference import visibility_mask

_BIG = jnp.iinfo(jnp.int32).max


def _pad_rows(x, multiple: int, value):
    """Pad axis 0 of ``x`` up to a multiple of ``multiple`` with ``value``."""
    x = jnp.asarray(x)
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


def _block_bounds(pos, seg, block: int):
    """Per-block ``(min_pos, max_pos, min_seg, max_seg)`` over the real (``seg >= 0``) rows.

    An all-padding block gets an empty range (min > max) so it overlaps nothing.
    """
    pos = pos.reshape(-1, block)
    seg = seg.reshape(-1, block)
    real = seg >= 0
    min_pos = jnp.where(real, pos, _BIG).min(axis=1)
    max_pos = jnp.where(real, pos, -_BIG).max(axis=1)
    min_seg = jnp.where(real, seg, _BIG).min(axis=1)
    max_seg = jnp.where(real, seg, -1).max(axis=1)
    return min_pos, max_pos, min_seg, max_seg


def _may_overlap(q_bounds, kv_bounds, window: Optional[int]):
    """Whether some query of the block may see some key of the block (conservative)."""
    q_min_pos, q_max_pos, q_min_seg, q_max_seg = q_bounds
    kv_min_pos, kv_max_pos, kv_min_seg, kv_max_seg = kv_bounds
    ok = (kv_min_pos <= q_max_pos) & (kv_min_seg <= q_max_seg) & (q_min_seg <= kv_max_seg)
    if window is not None:
        ok &= (q_min_pos - kv_max_pos) < window
    return ok


def attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window: Optional[int] = None,
           block_q: int = 512, block_k: int = 512):
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

    qp = _pad_rows(q, block_q, 0)
    q_pos_p = _pad_rows(q_pos.astype(jnp.int32), block_q, 0)
    q_seg_p = _pad_rows(q_seg.astype(jnp.int32), block_q, -1)
    kp = _pad_rows(k, block_k, 0)
    vp = _pad_rows(v, block_k, 0)
    kv_pos_p = _pad_rows(kv_pos.astype(jnp.int32), block_k, 0)
    kv_seg_p = _pad_rows(kv_seg.astype(jnp.int32), block_k, -1)
    n_q, n_k = qp.shape[0] // block_q, kp.shape[0] // block_k

    q_blocks = qp.reshape(n_q, block_q, hkv, group, d)
    k_blocks = kp.reshape(n_k, block_k, hkv, d)
    v_blocks = vp.reshape(n_k, block_k, hkv, d)
    kv_pos_blocks = kv_pos_p.reshape(n_k, block_k)
    kv_seg_blocks = kv_seg_p.reshape(n_k, block_k)
    q_bounds = _block_bounds(q_pos_p, q_seg_p, block_q)
    kv_bounds = _block_bounds(kv_pos_p, kv_seg_p, block_k)

    def one_query_block(i):
        qb = q_blocks[i].astype(jnp.float32) * scale            # [bq, Hkv, G, D]
        qb_pos = jax.lax.dynamic_slice_in_dim(q_pos_p, i * block_q, block_q)
        qb_seg = jax.lax.dynamic_slice_in_dim(q_seg_p, i * block_q, block_q)
        qb_bounds = tuple(b[i] for b in q_bounds)

        def update(j, carry):
            m, l, acc = carry
            s = jnp.einsum("qhgd,khd->hgqk", qb, k_blocks[j].astype(jnp.float32))
            mask = visibility_mask(qb_pos, kv_pos_blocks[j], qb_seg, kv_seg_blocks[j], window)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l_new = alpha * l + p.sum(axis=-1)
            acc_new = alpha[..., None] * acc + jnp.einsum(
                "hgqk,khd->hgqd", p, v_blocks[j].astype(jnp.float32))
            return m_new, l_new, acc_new

        def maybe_update(j, carry):
            kvb_bounds = tuple(b[j] for b in kv_bounds)
            visible = _may_overlap(qb_bounds, kvb_bounds, window)
            return jax.lax.cond(visible, update, lambda _, c: c, j, carry)

        init = (jnp.full((hkv, group, block_q), -jnp.inf, jnp.float32),
                jnp.zeros((hkv, group, block_q), jnp.float32),
                jnp.zeros((hkv, group, block_q, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, n_k, maybe_update, init)
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        out = out.transpose(2, 0, 1, 3).reshape(block_q, hq, d)   # [bq, Hq, D]
        lse = lse.transpose(2, 0, 1).reshape(block_q, hq)
        return out, lse

    out, lse = jax.lax.map(one_query_block, jnp.arange(n_q))
    out = out.reshape(n_q * block_q, hq, d)[:tq].astype(q.dtype)
    lse = lse.reshape(n_q * block_q, hq)[:tq]
    return out, lse
