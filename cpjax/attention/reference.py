"""The plain-jnp ``attend``: the oracle every other attention path is tested against.

Masks come only from positions and segment ids (``cpjax.attention.masks``, DESIGN.md): key
``j`` is visible to query ``i`` iff ``kv_seg[j] == q_seg[i]``, ``q_seg[i] >= 0`` and
``kv_pos[j] <= q_pos[i]`` (and, with a sliding ``window``, ``q_pos[i] - kv_pos[j] < window``).
It materialises the full ``[Hq, Tq, Tk]`` score matrix, so it is for tests and short inputs;
``blockwise.attend`` is the fast path with the same contract.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from cpjax.attention.masks import check_attend_inputs, visibility_mask

NEG_INF = float("-inf")


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
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
):
    """Exact masked softmax attention with grouped-query heads.

    Args:
      q: ``[Tq, Hq, D]`` queries (already scaled by nothing: the ``1/sqrt(D)`` is applied here).
      k, v: ``[Tk, Hkv, D]`` keys and values, ``Hq % Hkv == 0`` (never repeated in memory).
      q_pos, kv_pos: ``[Tq]``, ``[Tk]`` int32 global token positions.
      q_seg, kv_seg: ``[Tq]``, ``[Tk]`` int32 sequence ids; negative marks padding.
      window: optional sliding-window size.
      block_q, block_k: part of the contract; the dense reference is one block and ignores
        them.

    Returns:
      ``(out, lse)``: ``out [Tq, Hq, D]`` in ``q.dtype`` (0 where a query sees no key) and
      ``lse [Tq, Hq]`` float32, the natural-log log-sum-exp of the scaled scores (``-inf`` where
      the query sees no key).
    """
    check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qg = q.reshape(tq, hkv, group, d).astype(jnp.float32)
    scores = jnp.einsum("qhgd,khd->hgqk", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(d))
    mask = visibility_mask(q_pos, kv_pos, q_seg, kv_seg, window)
    scores = jnp.where(mask[None, None], scores, NEG_INF)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [Hkv, G, Tq]; -inf where nothing is visible
    safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    probs = jnp.where(mask[None, None], jnp.exp(scores - safe_lse[..., None]), 0.0)
    out = jnp.einsum("hgqk,khd->qhgd", probs, v.astype(jnp.float32))
    return out.reshape(tq, hq, d).astype(q.dtype), lse.reshape(hq, tq).T
