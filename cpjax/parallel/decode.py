"""Context-parallel decode: which rank stores each new token, and the decode attention plans.

Two exact ways to decode ``B`` sequences whose KV cache is sharded over the ranks:

* replicated queries (``allreduce``, beyond the paper): every rank runs the (cheap) linear
  layers for all ``B`` tokens, attends its own cache shard, and the partials merge in one
  ``pmax``/``psum`` (:func:`replicated_decode_attention`); no ring, no all-to-all. On one rank
  (no axis) it is plain attention over the cache plus the new tokens.
* the paper's ring pass-Q (``ring_pass_q``): each rank computes the tokens it owns
  (:func:`owned_slots`), a pass-Q ring (``cpjax.parallel.ring``) visits every cache shard.

In both, token ``b``'s K/V is stored on its owner (:func:`decode_owners`), round-robin shifted
by one each step, so the cache shards stay balanced.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from cpjax.attention.masks import PAD_SEGMENT
from cpjax.attention.merge import merge_reduced
from cpjax.attention.plans import attend_parts, kv_parts
from cpjax.parallel.mesh import Ranks


def decode_owners(fills, step, batch: int):
    """Rank that stores (and, in ring decode, computes) each of ``batch`` new tokens: ``[batch]``.

    Round-robin with the start shifted by one each step, as in the paper, but aware of the
    cache fills: in each round of up to N tokens, the least-filled ranks go first, ties broken
    in round-robin order from ``step``. With equal fills this is exactly the paper's
    ``(b + step) mod N``; after uneven turns it steers new tokens to the emptier ranks. No rank
    gets more than ``ceil(batch / N)`` tokens.

    Args: ``fills [N]`` int32 slots used per rank, ``step`` int32 scalar.
    """
    n = fills.shape[0]
    key = fills * n + (jnp.arange(n) - step) % n
    owners = []
    for first in range(0, batch, n):
        ranks = jnp.argsort(key)[: min(n, batch - first)]
        owners.append(ranks)
        key = key.at[ranks].add(n)
    return jnp.concatenate(owners).astype(jnp.int32)


def fills_after_decode(fills, batch: int) -> list[int]:
    """The rank fills after a decode step of ``batch`` tokens, sorted (host ints).

    :func:`decode_owners` gives each round of up to N tokens to the least-filled ranks, one
    token each, so which ranks tie does not change the sorted fills: each round adds one to
    the smallest ``min(N, left)``. The engine checks decode room with this instead of fetching
    the fills from the devices every step (a sync before each step).
    """
    fills = sorted(int(f) for f in fills)
    for first in range(0, batch, len(fills)):
        taken = min(len(fills), batch - first)
        fills = sorted([f + 1 for f in fills[:taken]] + fills[taken:])
    return fills


def owned_slots(owners, rank, n_ranks: int):
    """The ``ceil(B / N)`` rows a rank handles: its own tokens first, then others as filler.

    Args: ``owners [B]`` int32 (:func:`decode_owners`), ``rank`` int32 scalar.
    Returns ``(rows [ceil(B/N)] int32 indices into the batch, real [ceil(B/N)] bool)``;
    ``real`` marks the rows this rank owns (the rest must be treated as padding).
    """
    per_rank = -(-owners.shape[0] // n_ranks)
    rows = jnp.argsort(owners != rank, stable=True)[:per_rank].astype(jnp.int32)
    return rows, owners[rows] == rank


def owned_segments(segments, real):
    """``segments`` with the rows a rank does not own marked as padding (invisible, and
    overwritten by the next cache append)."""
    return jnp.where(real, segments, PAD_SEGMENT)


def replicated_decode_attention(attend: Callable, ranks: Ranks, keep_new) -> Callable:
    """Attention plan (see ``cpjax.model``) for replicated-query decode.

    Every rank holds the same new queries/keys/values and its own cache shard in ``past``. Each
    rank attends its shard, plus the new keys if ``keep_new`` (true on exactly one rank per
    token, the one that will store it), and the partials merge across ``ranks`` in one step:
    ``pmax`` of the LSE, then ``psum`` of the weighted outputs and weights
    (``cpjax.attention.merge.merge_reduced``). Without an axis it is plain attention.
    """

    def plan(q, k, v, positions, segments, past, window=None):
        new_seg = jnp.where(keep_new, segments, PAD_SEGMENT)  # the new keys count on one rank
        parts = kv_parts(k, v, positions, new_seg, past)
        out, lse = attend_parts(attend, q, positions, segments, parts, window)
        if ranks.axis is not None:
            out, lse = merge_reduced(
                out,
                lse,
                functools.partial(jax.lax.pmax, axis_name=ranks.axis),
                functools.partial(jax.lax.psum, axis_name=ranks.axis),
            )
        return out.astype(q.dtype), lse

    return plan
