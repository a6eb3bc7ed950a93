"""Attention plans: what the model's attention calls, built from an ``attend`` function.

A plan is ``plan(q, k, v, positions, segments, past, window=None) -> (out, lse)``: the new
tokens' queries against their own keys/values and, if given, a :class:`PastKV` (one layer's
cached keys and values), each query seeing keys less than ``window`` positions back when a
sliding window is given. :func:`with_past` is the single-device plan; the context-parallel
plans (rings, decode) live in ``cpjax.parallel`` and use the same :func:`attend_parts`.
:func:`skipping_invisible` makes an ``attend`` skip (``lax.cond``, not a mask) every part that
no query can see.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from cpjax.attention.layer_view import materialized, materializing
from cpjax.attention.masks import bounds, check_attend_inputs, may_overlap
from cpjax.attention.merge import merge


class PastKV(NamedTuple):
    """Keys/values that new tokens attend to in addition to themselves (e.g. a KV cache).

    k, v: ``[L, Tp, Hkv, Dh]`` for the model; for a plan, one layer's ``[Tp, Hkv, Dh]``: an
    array or a :class:`~cpjax.attention.layer_view.LayerView` of the model's stack (read in
    place by attentions that can, see :func:`materializing`);
    pos, seg: ``[Tp]`` int32 (a negative segment marks an empty slot).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    seg: jax.Array


def materialized_parts(parts: tuple) -> tuple:
    """``parts`` with every ``LayerView`` materialised (before parts travel a ring)."""
    return tuple(
        (materialized(k), materialized(v), kv_pos, kv_seg) for k, v, kv_pos, kv_seg in parts
    )


def kv_parts(k, v, positions, segments, past: Optional[PastKV]) -> tuple:
    """The key/value parts new queries attend: their own rows, then ``past`` (cast to ``k``'s
    dtype) if given; each a ``(k, v, kv_pos, kv_seg)`` tuple."""
    parts = ((k, v, positions, segments),)
    if past is not None:
        parts += ((past.k.astype(k.dtype), past.v.astype(v.dtype), past.pos, past.seg),)
    return parts


PART_PIECES = 2  # a rank's rows are two layout chunks (cpjax.parallel.layout)


def _piece_bounds(pos, seg, pieces: int):
    """Bounds of ``pieces`` equal runs of the rows (one run if they do not divide evenly)."""
    if pos.shape[0] % pieces:
        pieces = 1
    return bounds(pos.reshape(pieces, -1), seg.reshape(pieces, -1))


def part_visible(q_pos, q_seg, kv_pos, kv_seg, window: Optional[int] = None):
    """Scalar bool: may some query (``q_pos, q_seg [Tq]``) see some key (``kv_pos, kv_seg
    [Tk]``)? False proves the whole part invisible.

    Both sides are summarised by the bounds of :data:`PART_PIECES` equal runs of rows (a rank's
    two layout chunks, which sit at opposite ends of the sequence: one pair of bounds over both
    would span everything) and tested pairwise with ``cpjax.attention.masks.may_overlap``.
    """
    if q_pos.shape[0] == 0 or kv_pos.shape[0] == 0:
        return jnp.asarray(False)
    q = _piece_bounds(q_pos, q_seg, PART_PIECES)
    kv = _piece_bounds(kv_pos, kv_seg, PART_PIECES)
    pairs = may_overlap(
        jax.tree.map(lambda x: x[:, None], q), jax.tree.map(lambda x: x[None, :], kv), window
    )
    return jnp.any(pairs)


def skipping_invisible(attend: Callable) -> Callable:
    """``attend`` guarded by :func:`part_visible`: when no query can see any key (a ring step
    or a cache shard outside every query's window, or all in the future), it returns the empty
    result (``out = 0``, ``lse = -inf``) without running ``attend`` at all (``lax.cond``: the
    attention is skipped, not masked). Same signature and keywords as ``attend``."""

    @functools.wraps(attend)
    def guarded(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window: Optional[int] = None, **kw):
        check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg)  # before any use of them

        def run(_):
            out, lse = attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window, **kw)
            return out.astype(q.dtype), lse.astype(jnp.float32)

        def skip(_):
            empty_out = jnp.zeros(q.shape[:2] + v.shape[2:], q.dtype)
            return empty_out, jnp.full(q.shape[:2], -jnp.inf, jnp.float32)

        return jax.lax.cond(part_visible(q_pos, q_seg, kv_pos, kv_seg, window), run, skip, None)

    return guarded


def attend_parts(attend: Callable, q, q_pos, q_seg, parts, window: Optional[int] = None):
    """Attention of ``q`` over several K/V parts, merged by log-sum-exp (float32 ``out``).

    ``parts``: a tuple of ``(k, v, kv_pos, kv_seg)``, e.g. a rank's new rows and its cache
    shard. Keeping them apart (instead of concatenating) lets each keep its own block
    structure (and an implementation wrapped by :func:`skipping_invisible` skips a part no query
    can see).
    """
    out = lse = None
    for k, v, kv_pos, kv_seg in parts:
        part_out, part_lse = attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)
        if out is None:
            out, lse = part_out.astype(jnp.float32), part_lse
        else:
            out, lse = merge(out, lse, part_out, part_lse)
    return out, lse


def with_past(attend: Callable) -> Callable:
    """The single-device attention plan of the model built from ``attend``: the queries attend
    to the new keys/values and to ``past`` when given, merged by log-sum-exp. (``attend`` gets
    the past as arrays unless it reads layer views itself.)"""
    attend = materializing(attend)

    def plan(q, k, v, positions, segments, past: Optional[PastKV], window: Optional[int] = None):
        parts = kv_parts(k, v, positions, segments, past)
        out, lse = attend_parts(attend, q, positions, segments, parts, window)
        return out.astype(q.dtype), lse

    return plan
