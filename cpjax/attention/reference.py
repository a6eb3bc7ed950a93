"""The plain-jnp ``attend``: the oracle every other attention path is tested against.

Masks come only from positions and segment ids (see DESIGN.md): key ``j`` is visible to query
``i`` iff ``kv_seg[j] == q_seg[i]``, ``q_seg[i] >= 0`` and ``kv_pos[j] <= q_pos[i]`` (and, with a
sliding ``window``, ``q_pos[i] - kv_pos[j] < window``). It materialises the full
``[Hq, Tq, Tk]`` score matrix, so it is for tests and short inputs; ``blockwise.attend`` is the
fast path with the same contract.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def visibility_mask(q_pos, kv_pos, q_seg, kv_seg, window: Optional[int] = None):
    """``[Tq, Tk]`` bool: which keys each query may see.

    Args:
      q_pos, q_seg: ``[Tq]`` int32 positions / segment ids of the queries (segment < 0 = padding).
      kv_pos, kv_seg: ``[Tk]`` int32 positions / segment ids of the keys.
      window: optional sliding window; a key further than ``window - 1`` positions back is hidden.
    """
    same_segment = (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] >= 0)
    causal = kv_pos[None, :] <= q_pos[:, None]
    mask = same_segment & causal
    if window is not None:
        mask &= (q_pos[:, None] - kv_pos[None, :]) < window
    return mask


def attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window: Optional[int] = None):
    """Exact masked softmax attention with grouped-query heads.

    Args:
      q: ``[Tq, Hq, D]`` queries (already scaled by nothing: the ``1/sqrt(D)`` is applied here).
      k, v: ``[Tk, Hkv, D]`` keys and values, ``Hq % Hkv == 0`` (never repeated in memory).
      q_pos, kv_pos: ``[Tq]``, ``[Tk]`` int32 global token positions.
      q_seg, kv_seg: ``[Tq]``, ``[Tk]`` int32 sequence ids; negative marks padding.
      window: optional sliding-window size.

    Returns:
      ``(out, lse)``: ``out [Tq, Hq, D]`` in ``q.dtype`` (0 where a query sees no key) and
      ``lse [Tq, Hq]`` float32, the natural-log log-sum-exp of the scaled scores (``-inf`` where
      the query sees no key).
    """
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
