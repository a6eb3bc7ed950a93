"""Visibility by positions and segments: the one rule every attention path uses, and the one
block-bounds test every blocked path skips by.

Key ``j`` is visible to query ``i`` iff ``kv_seg[j] == q_seg[i]``, ``q_seg[i] >= 0`` and
``kv_pos[j] <= q_pos[i]`` (and, with a sliding ``window``, ``q_pos[i] - kv_pos[j] < window``).
A blocked path summarises each block of rows by :class:`BlockBounds` and skips a (query block,
key block) pair when :func:`may_overlap` proves no query of one sees a key of the other.

A leaf module (imports jax, chex, ``layer_view`` and ``cpjax.errors``) so that
``pallas_kernels`` may use it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from cpjax.attention.layer_view import LayerView
from cpjax.errors import CpjaxError, require

#: Segment id of padding rows and empty cache slots: invisible to every query, sees nothing.
PAD_SEGMENT = -1

_BIG = int(jnp.iinfo(jnp.int32).max)


def check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> None:
    """Raise :class:`CpjaxError` unless the arguments fit the ``attend`` contract.

    ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` (floats; ``k`` and ``v`` of one dtype) with
    ``Hq % Hkv == 0``;
    ``q_pos, q_seg [Tq]`` and ``kv_pos, kv_seg [Tk]`` integer (int32 once on the device).
    ``k, v`` may be :class:`~cpjax.attention.layer_view.LayerView` s of a layer-stacked cache.
    Checks shapes and dtypes only, so it costs nothing under ``jax.jit``.
    """
    k, v = (
        jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, LayerView) else x for x in [k, v]
    )
    try:
        chex.assert_rank([q, k, v, q_pos, kv_pos, q_seg, kv_seg], [3, 3, 3, 1, 1, 1, 1])
        chex.assert_equal_shape([k, v])
        chex.assert_type([q, k, v], float)
        chex.assert_type(v, k.dtype)
        chex.assert_type([q_pos, kv_pos, q_seg, kv_seg], int)
        chex.assert_shape([q_pos, q_seg], (q.shape[0],))
        chex.assert_shape([kv_pos, kv_seg], (k.shape[0],))
        chex.assert_equal(k.shape[2], q.shape[2], custom_message="head_dim of k vs q")
    except AssertionError as error:
        raise CpjaxError(
            f"attention inputs (q, k, v, q_pos, kv_pos, q_seg, kv_seg): {error}"
        ) from None
    require(
        q.shape[1] % k.shape[1] == 0,
        f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})",
    )


def visible(q_pos, kv_pos, q_seg, kv_seg, window: Optional[int] = None):
    """The rule, elementwise on broadcast-compatible arrays (a kernel's loaded tiles)."""
    mask = (q_seg == kv_seg) & (q_seg >= 0) & (kv_pos <= q_pos)
    if window is not None:
        mask &= (q_pos - kv_pos) < window
    return mask


def visibility_mask(q_pos, kv_pos, q_seg, kv_seg, window: Optional[int] = None):
    """``[Tq, Tk]`` bool: which keys each query may see.

    Args:
      q_pos, q_seg: ``[Tq]`` int32 positions / segment ids of the queries (segment < 0 = padding).
      kv_pos, kv_seg: ``[Tk]`` int32 positions / segment ids of the keys.
      window: optional sliding window; a key further than ``window - 1`` positions back is hidden.
    """
    return visible(q_pos[:, None], kv_pos[None, :], q_seg[:, None], kv_seg[None, :], window)


class BlockBounds(NamedTuple):
    """Summaries of positions and segments over the real (``seg >= 0``) rows of blocks.

    Each field has the shape of the block index (a scalar for one block). An all-padding block
    gets empty ranges (min > max) so it overlaps nothing.
    """

    min_pos: jax.Array
    max_pos: jax.Array
    min_seg: jax.Array
    max_seg: jax.Array
    all_real: jax.Array  # no padding row in the block


def bounds(pos, seg) -> BlockBounds:
    """:class:`BlockBounds` of ``pos, seg [..., rows]`` reduced over the last axis (rows)."""
    real = seg >= 0
    return BlockBounds(
        min_pos=jnp.min(jnp.where(real, pos, _BIG), axis=-1),
        max_pos=jnp.max(jnp.where(real, pos, -_BIG), axis=-1),
        min_seg=jnp.min(jnp.where(real, seg, _BIG), axis=-1),
        max_seg=jnp.max(jnp.where(real, seg, -1), axis=-1),
        all_real=jnp.min(seg, axis=-1) >= 0,
    )


def block_bounds(pos, seg, block: int) -> BlockBounds:
    """:class:`BlockBounds` ``[T / block]`` of each consecutive ``block`` rows of
    ``pos, seg [T]`` (``T % block == 0``)."""
    return bounds(pos.reshape(-1, block), seg.reshape(-1, block))


def may_overlap(q: BlockBounds, kv: BlockBounds, window: Optional[int] = None):
    """Whether some query of the block may see some key of the block (conservative: False
    proves the pair invisible)."""
    ok = (kv.min_pos <= q.max_pos) & (kv.min_seg <= q.max_seg) & (q.min_seg <= kv.max_seg)
    if window is not None:
        ok &= (q.min_pos - kv.max_pos) < window
    return ok


def fully_visible(q: BlockBounds, kv: BlockBounds, window: Optional[int] = None):
    """Whether every query of the block sees every key of the block (no mask needed).

    True only when both blocks are free of padding and hold one and the same segment, and every
    key position is at or before every query position (and inside the window).
    """
    ok = (
        q.all_real
        & kv.all_real
        & (q.min_seg == q.max_seg)
        & (kv.min_seg == kv.max_seg)
        & (q.min_seg == kv.min_seg)
        & (kv.max_pos <= q.min_pos)
    )
    if window is not None:
        ok &= (q.max_pos - kv.min_pos) < window
    return ok


def visible_block_schedule(
    q_pos, kv_pos, q_seg, kv_seg, block_q: int, block_k: int, window: Optional[int] = None
):
    """For each query block, the key blocks that some of its queries may see.

    Args:
      q_pos, q_seg: ``[Tq]`` int32 with ``Tq % block_q == 0`` (padding rows: segment -1).
      kv_pos, kv_seg: ``[Tk]`` int32 with ``Tk % block_k == 0``.

    Returns:
      ``(blocks [n_q, n_k] int32, counts [n_q] int32)``: row ``i`` of ``blocks`` lists the key
      blocks query block ``i`` may see (:func:`may_overlap`) in increasing order, then the
      others; ``counts[i]`` is how many it may see.
    """
    q_bounds = block_bounds(q_pos, q_seg, block_q)
    kv_bounds = block_bounds(kv_pos, kv_seg, block_k)
    overlap = may_overlap(
        BlockBounds(*(b[:, None] for b in q_bounds)),
        BlockBounds(*(b[None, :] for b in kv_bounds)),
        window,
    )
    blocks = jnp.argsort(~overlap, axis=1, stable=True).astype(jnp.int32)
    return blocks, overlap.sum(axis=1, dtype=jnp.int32)
