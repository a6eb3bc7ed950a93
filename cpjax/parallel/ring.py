"""Context-parallel attention strategies, run per rank inside ``shard_map`` (paper §3-4).

Each strategy runs a single-device ``attend`` over the local shard of a sequence sharded over
the ``context`` axis (``ring_attention`` makes it the model's attention plan):

* ``pass_kv`` — queries stay; the K/V block (with its positions and segments) travels around the
  ring with ``ppermute``; N partial attentions merge by log-sum-exp locally. The next block's
  ``ppermute`` is issued before the current block's attention so XLA can overlap them.
* ``pass_q`` — K/V stay; the query block travels; at the end one ``all_to_all`` returns each
  partial (out, lse) to the rank that owns those queries, which merges them.
* ``all_gather`` — gather all K/V once, then one local attention (the baseline).

Only KV heads travel (GQA heads are never repeated). Partials are merged in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from cpjax.attention.merge import merge, merge_stacked
from cpjax.attention.plans import attend_parts, kv_parts
from cpjax.dispatch import AttentionImpl
from cpjax.names import STRATEGIES, check_choice


def _ring_shift(tree, axis: str, n: int):
    """Send every array of ``tree`` from rank i to rank (i + 1) mod n."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)


def pass_kv(attend: Callable, axis: str, n: int, q, q_pos, q_seg, parts, window=None):
    """Ring pass-KV: at step j rank r holds the K/V parts of rank (r - j) mod n.

    Args: local shards, ``q [Tq, Hq, D]``, ``q_pos, q_seg [Tq]``, ``parts`` a tuple of
      ``(k, v [Tk, Hkv, D], kv_pos, kv_seg [Tk])``, ``window`` an optional sliding window.
      A step whose keys no local query can see (outside every window, or all in the future)
      is skipped, not masked (``cpjax.attention.plans.attend_part``).
    Returns: ``(out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32)`` over all ranks' keys.
    """
    block = parts
    out = lse = None
    for step in range(n):
        following = _ring_shift(block, axis, n) if step < n - 1 else None
        part_out, part_lse = attend_parts(attend, q, q_pos, q_seg, block, window)
        if out is None:
            out, lse = part_out, part_lse
        else:
            out, lse = merge(out, lse, part_out, part_lse)
        block = following
    return out.astype(q.dtype), lse


def pass_q(attend: Callable, axis: str, n: int, q, q_pos, q_seg, parts, window=None):
    """Ring pass-Q: at step j rank r holds the queries of rank (r - j) mod n.

    After the ring, rank r holds partials of every origin's queries against its own K/V; one
    ``all_to_all`` sends each to its origin, which merges the n partials of its queries.
    Same arguments and result as :func:`pass_kv`.
    """
    travelling = (q, q_pos, q_seg)
    outs, lses = [], []
    for step in range(n):
        following = _ring_shift(travelling, axis, n) if step < n - 1 else None
        part_out, part_lse = attend_parts(attend, *travelling, parts, window)
        outs.append(part_out.astype(q.dtype))
        lses.append(part_lse)
        travelling = following
    rank = jax.lax.axis_index(axis)
    # Step j produced the partial for origin (rank - j) mod n; order them by destination.
    by_step_out, by_step_lse = jnp.stack(outs), jnp.stack(lses)
    step_of_dest = (rank - jnp.arange(n)) % n
    send_out = jnp.take(by_step_out, step_of_dest, axis=0)
    send_lse = jnp.take(by_step_lse, step_of_dest, axis=0)
    # Afterwards row s holds my queries' partial against the K/V of rank s.
    recv_out = jax.lax.all_to_all(send_out, axis, split_axis=0, concat_axis=0, tiled=True)
    recv_lse = jax.lax.all_to_all(send_lse, axis, split_axis=0, concat_axis=0, tiled=True)
    out, lse = merge_stacked(recv_out, recv_lse)
    return out.astype(q.dtype), lse


def all_gather(attend: Callable, axis: str, n: int, q, q_pos, q_seg, parts, window=None):
    """Gather every rank's K/V parts (with positions and segments), then attend locally."""
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=0, tiled=True)
    out, lse = attend_parts(attend, q, q_pos, q_seg, jax.tree.map(gather, parts), window)
    return out.astype(q.dtype), lse


_RINGS = {"pass_kv": pass_kv, "pass_q": pass_q, "all_gather": all_gather}


def chunk_blocks(impl: AttentionImpl, local_rows: int) -> dict:
    """The ``block_q``/``block_k`` keywords with which ``impl.attend`` cuts a rank's
    ``local_rows`` into blocks that tile one layout chunk (``local_rows // 2`` rows); ``{}``
    (its defaults) when the chunk is not a positive multiple of ``impl.tile`` or ``impl`` does
    not work by blocks.

    A rank's rows are chunks ``r`` and ``2N-1-r`` (``cpjax.parallel.layout``); a block that
    straddles both spans positions from both ends of the sequence, so its causal bounds prove
    nothing and it is computed in full. Blocks that tile the chunk let the implementation skip
    the chunk pairs that are fully masked, halving the causal work of every ring step. Each
    block is the largest divisor of the chunk shared with the implementation's default
    (``gcd``: a multiple of the tile). With several sequences packed in one row the chunks are
    per sequence; the blocks then tile them only when the gcd also divides each.
    """
    chunk = local_rows // 2
    if impl.block_q is None or local_rows % 2 or chunk == 0 or chunk % impl.tile:
        return {}
    return {"block_q": math.gcd(chunk, impl.block_q), "block_k": math.gcd(chunk, impl.block_k)}


MAX_TILE_PADDING = 8  # pad a chunk to the tile only if that adds <= 1/8 of its rows


def chunk_rows_multiple(impl: AttentionImpl, n_ranks: int, bucket: int, length: int) -> int:
    """The multiple of rows each layout chunk is padded to (``balanced_layout(...,
    pad_multiple=...)``) so that ``impl``'s blocks never straddle two chunks.

    Args:
      impl: the attention implementation of the ring.
      n_ranks: context-parallel size N (``2N`` chunks per sequence).
      bucket: shape bucketing of the whole sequence: each chunk is padded to a multiple of
        ``bucket // 2N`` rows (at least 1), so lengths share compiled shapes.
      length: tokens of the longest sequence laid out.

    Rule: a chunk is padded to a multiple of the tile when that adds at most
    ``1 / MAX_TILE_PADDING`` of its rows. Padding runs through every layer (not only attention),
    while a chunk that is not tile-aligned loses the causal skip of at most the one block that
    straddles its boundary per ring step; so short chunks (under one tile, or a few tiles with a
    large remainder: 75 rows would become 128) keep bucketing alone, and long ones (where GPU
    prefill spends its time) are aligned for a few percent of padding.
    """
    per_chunk = max(1, bucket // (2 * n_ranks))
    chunk = -(-length // (2 * n_ranks))
    chunk = -(-chunk // per_chunk) * per_chunk
    aligned = math.lcm(per_chunk, impl.tile)
    padding = -(-chunk // aligned) * aligned - chunk
    if chunk < impl.tile or padding * MAX_TILE_PADDING > chunk:
        return per_chunk
    return aligned


def ring_attention(strategy: str, impl: AttentionImpl, axis: str, n: int) -> Callable:
    """The model's attention plan (see ``cpjax.model.decoder``) for a context-parallel forward,
    with the layer's sliding window (if any) applied in every step.

    Each ring step calls ``impl.attend`` with blocks that tile one layout chunk
    (:func:`chunk_blocks`; lay the rows out with :func:`chunk_rows_multiple`). ``past`` is this
    rank's shard of the KV cache. It takes part in the ring next to the rank's new keys/values,
    as a separate part: pass-KV circulates both (the paper's message of ``max_j P_j + T/N``
    rows: here the local cache window plus the new rows), pass-Q keeps both in place and
    circulates the new queries. Exact for any cache placement, because masks come from the
    positions and segments that travel with the rows.
    """
    check_choice("context-parallel strategy", strategy, STRATEGIES)

    def plan(q, k, v, positions, segments, past, window=None):
        step_attend = functools.partial(impl.attend, **chunk_blocks(impl, q.shape[0]))
        parts = kv_parts(k, v, positions, segments, past)
        if n == 1:
            out, lse = attend_parts(step_attend, q, positions, segments, parts, window)
            return out.astype(q.dtype), lse
        return _RINGS[strategy](step_attend, axis, n, q, positions, segments, parts, window)

    return plan
