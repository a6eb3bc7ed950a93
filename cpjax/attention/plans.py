"""Attention plans: what the model's attention calls, built from an ``attend`` function.

A plan is ``plan(q, k, v, positions, segments, past) -> (out, lse)``: the new tokens' queries
against their own keys/values and, if given, a :class:`PastKV` (one layer's cached keys and
values). :func:`with_past` is the single-device plan; the context-parallel plans (rings, decode)
live in ``cpjax.parallel`` and use the same :func:`attend_parts`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from cpjax.attention.merge import merge


class PastKV(NamedTuple):
    """Keys/values that new tokens attend to in addition to themselves (e.g. a KV cache).

    k, v: ``[L, Tp, Hkv, Dh]`` for the model (``[Tp, Hkv, Dh]``, one layer's, for a plan);
    pos, seg: ``[Tp]`` int32 (a negative segment marks an empty slot).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    seg: jax.Array


def kv_parts(k, v, positions, segments, past: Optional[PastKV]) -> tuple:
    """The key/value parts new queries attend: their own rows, then ``past`` (cast to ``k``'s
    dtype) if given; each a ``(k, v, kv_pos, kv_seg)`` tuple."""
    parts = ((k, v, positions, segments),)
    if past is not None:
        parts += ((past.k.astype(k.dtype), past.v.astype(v.dtype), past.pos, past.seg),)
    return parts


def attend_parts(attend: Callable, q, q_pos, q_seg, parts):
    """Attention of ``q`` over several K/V parts, merged by log-sum-exp (float32 ``out``).

    ``parts``: a tuple of ``(k, v, kv_pos, kv_seg)``, e.g. a rank's new rows and its cache
    shard. Keeping them apart (instead of concatenating) lets each keep its own block
    structure, so an empty or fully masked part costs almost nothing.
    """
    out = lse = None
    for k, v, kv_pos, kv_seg in parts:
        part_out, part_lse = attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        if out is None:
            out, lse = part_out.astype(jnp.float32), part_lse
        else:
            out, lse = merge(out, lse, part_out, part_lse)
    return out, lse


def with_past(attend: Callable) -> Callable:
    """The single-device attention plan of the model built from ``attend``: the queries attend
    to the new keys/values and to ``past`` when given, merged by log-sum-exp."""

    def plan(q, k, v, positions, segments, past: Optional[PastKV]):
        out, lse = attend_parts(
            attend, q, positions, segments, kv_parts(k, v, positions, segments, past)
        )
        return out.astype(q.dtype), lse

    return plan
