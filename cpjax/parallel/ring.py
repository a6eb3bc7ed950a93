"""Context-parallel attention strategies, run per rank inside ``shard_map`` (paper §3-4).

Each strategy runs a single-device ``attend`` over the local shard of a sequence sharded over
the ``context`` axis (``ring_attention`` makes it the model's attention plan):

* ``pass_kv`` — queries stay; the K/V block (with its positions and segments) travels around the
  ring with ``ppermute``; N partial attentions merge by log-sum-exp locally. The next block's
  ``ppermute`` is issued before the current block's attention so XLA can overlap them. The
  steps are a loop (``lax.scan``): a rank holds two blocks at a time, where an unrolled chain
  of shifts lets XLA issue them all at once and hold every rank's K/V (``O(T)`` a rank).
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
from cpjax.attention.plans import attend_parts, kv_parts, materialized_parts
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
    step = functools.partial(attend_parts, attend, q, q_pos, q_seg, window=window)
    if n == 1:
        out, lse = step(parts)
        return out.astype(q.dtype), lse

    def shift_then_step(carry, _):
        # The next block is sent before this one is attended (they overlap). A loop, not an
        # unrolled chain of shifts: XLA would issue an unrolled chain of independent shifts
        # at once and hold every rank's K/V; the loop holds two blocks.
        out, lse, block = carry
        following = _ring_shift(block, axis, n)
        out, lse = merge(out, lse, *step(block))
        return (out, lse, following), None

    following = _ring_shift(parts, axis, n)
    out, lse = step(parts)
    (out, lse, block), _ = jax.lax.scan(shift_then_step, (out, lse, following), None, n - 2)
    out, lse = merge(out, lse, *step(block))  # the last block: nothing follows
    return out.astype(q.dtype), lse


def pass_kv_exact_grad(
    grads: Callable, attend: Callable, axis: str, n: int, q, q_pos, q_seg, parts, window=None
):
    """:func:`pass_kv` with a hand-written backward ring (``jax.custom_vjp``), as in
    RingAttention: it keeps only this rank's inputs and the merged ``(out, lse)``; the backward
    sends the K/V parts around the ring once more, each with float32 ``dK, dV`` accumulators
    that collect every rank's contribution on the way and arrive home after ``n`` shifts.

    Autodiff of :func:`pass_kv` instead keeps every step's K/V block and partial result
    (``O(T)`` per rank, for any N). Here the backward of a step is
    ``grads(q, *part, out, lse, d_out, d_lse)`` with the *merged* ``(out, lse)``: the
    probabilities ``exp(S - lse)`` of a key block against the final ``lse`` are already its
    share, so the steps' gradients add up with no partial results and no merge to undo.

    Args: ``grads`` the attention's backward (``AttentionImpl.grads``, with the blocks of
      ``attend``); the others as for :func:`pass_kv`.
    Returns: as :func:`pass_kv`; differentiable in ``q`` and the parts' ``k, v``.
    """

    if window is not None:
        grads = functools.partial(grads, window=window)

    @jax.custom_vjp
    def ring(q, q_pos, q_seg, parts):
        return pass_kv(attend, axis, n, q, q_pos, q_seg, parts, window)

    def ring_fwd(q, q_pos, q_seg, parts):
        out, lse = ring(q, q_pos, q_seg, parts)
        return (out, lse), (q, q_pos, q_seg, parts, out, lse)

    def ring_bwd(residuals, cotangents):
        q, q_pos, q_seg, parts, out, lse = residuals

        def step(carry):
            """One key block's gradients: ``dq`` accumulates here, ``dk, dv`` travel on."""
            dq, block, d_block = carry
            arriving = []
            for (k, v, kv_pos, kv_seg), (dk, dv) in zip(block, d_block):
                dq_j, dk_j, dv_j = grads(
                    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, *cotangents
                )
                dq = dq + dq_j
                arriving.append((dk + dk_j, dv + dv_j))
            return dq, _ring_shift(tuple(arriving), axis, n)

        def shift_then_step(carry, _):
            # The next block is sent before this one's gradients (they overlap); a loop, not
            # an unrolled chain of shifts, so that only two blocks are ever held (XLA issues
            # an unrolled chain of independent shifts at once: every rank's K/V at hand).
            dq, block, d_block = carry
            following = _ring_shift(block, axis, n)
            dq, d_block = step((dq, block, d_block))
            return (dq, following, d_block), None

        d_block = tuple((jnp.zeros(k.shape, jnp.float32),) * 2 for k, *_ in parts)
        carry = (jnp.zeros(q.shape, jnp.float32), parts, d_block)
        carry, _ = jax.lax.scan(shift_then_step, carry, None, length=n - 1)
        dq, d_block = step(carry)  # the last block: nothing follows; dK/dV's n-th shift home
        d_parts = tuple(
            (dk.astype(k.dtype), dv.astype(v.dtype), None, None)
            for (k, v, _, _), (dk, dv) in zip(parts, d_block)
        )
        return dq.astype(q.dtype), None, None, d_parts

    ring.defvjp(ring_fwd, ring_bwd)
    return ring(q, q_pos, q_seg, parts)


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


def pass_q_exact_grad(
    grads: Callable, attend: Callable, axis: str, n: int, q, q_pos, q_seg, parts, window=None
):
    """:func:`pass_q` with a hand-written backward ring (``jax.custom_vjp``): K/V stay; each
    rank's queries travel the ring once more with what their gradient needs (positions,
    segments, the merged ``(out, lse)`` and its cotangents) and a float32 ``dQ`` accumulator
    that collects every rank's contribution and arrives home after ``n`` shifts; each rank
    accumulates ``dK, dV`` of its own parts in place. No ``all_to_all``: with the merged
    ``lse`` every step's gradients add up (see :func:`pass_kv_exact_grad`).

    Autodiff of :func:`pass_q` keeps every step's query block and partial result instead
    (``O(T)`` per rank, for any N).

    Args and result: as for :func:`pass_kv_exact_grad`.
    """

    if window is not None:
        grads = functools.partial(grads, window=window)

    @jax.custom_vjp
    def ring(q, q_pos, q_seg, parts):
        return pass_q(attend, axis, n, q, q_pos, q_seg, parts, window)

    def ring_fwd(q, q_pos, q_seg, parts):
        out, lse = ring(q, q_pos, q_seg, parts)
        return (out, lse), (q, q_pos, q_seg, parts, out, lse)

    def ring_bwd(residuals, cotangents):
        q, q_pos, q_seg, parts, out, lse = residuals

        def step(dq, d_parts, travelling):
            """The travelling queries' gradients against this rank's parts: ``dq`` travels
            on, ``dk, dv`` accumulate here."""
            tq, tq_pos, tq_seg, t_out, t_lse, t_d_out, t_d_lse = travelling
            d_parts = list(d_parts)
            for index, (k, v, kv_pos, kv_seg) in enumerate(parts):
                dq_j, dk_j, dv_j = grads(
                    tq, k, v, tq_pos, kv_pos, tq_seg, kv_seg, t_out, t_lse, t_d_out, t_d_lse
                )
                dq = dq + dq_j
                d_parts[index] = (d_parts[index][0] + dk_j, d_parts[index][1] + dv_j)
            return _ring_shift(dq, axis, n), tuple(d_parts)  # after n shifts: at its owner

        def shift_then_step(carry, _):
            # As in pass_kv_exact_grad: a loop holds two query blocks, not n.
            dq, d_parts, travelling = carry
            following = _ring_shift(travelling, axis, n)
            dq, d_parts = step(dq, d_parts, travelling)
            return (dq, d_parts, following), None

        d_parts = tuple((jnp.zeros(k.shape, jnp.float32),) * 2 for k, *_ in parts)
        travelling = (q, q_pos, q_seg, out, lse, *cotangents)
        carry = (jnp.zeros(q.shape, jnp.float32), d_parts, travelling)
        carry, _ = jax.lax.scan(shift_then_step, carry, None, length=n - 1)
        dq, d_parts = step(*carry)  # the last block: nothing follows
        d_parts = tuple(
            (dk.astype(k.dtype), dv.astype(v.dtype), None, None)
            for (k, v, _, _), (dk, dv) in zip(parts, d_parts)
        )
        return dq.astype(q.dtype), None, None, d_parts

    ring.defvjp(ring_fwd, ring_bwd)
    return ring(q, q_pos, q_seg, parts)


def all_gather(attend: Callable, axis: str, n: int, q, q_pos, q_seg, parts, window=None):
    """Gather every rank's K/V parts (with positions and segments), then attend locally."""
    gather = functools.partial(jax.lax.all_gather, axis_name=axis, axis=0, tiled=True)
    out, lse = attend_parts(attend, q, q_pos, q_seg, jax.tree.map(gather, parts), window)
    return out.astype(q.dtype), lse


_RINGS = {"pass_kv": pass_kv, "pass_q": pass_q, "all_gather": all_gather}
#: Rings with a hand-written backward, used when the implementation has ``grads``. The
#: all-gather ring is differentiated by autodiff (a reduce-scatter of dK/dV): it holds all
#: K/V on every rank in the forward already.
_EXACT_GRAD_RINGS = {"pass_kv": pass_kv_exact_grad, "pass_q": pass_q_exact_grad}


def chunk_blocks(impl: AttentionImpl, local_rows: int, for_grads: bool = False) -> dict:
    """The ``block_q``/``block_k`` keywords with which ``impl.attend`` (``impl.grads`` when
    ``for_grads``, from its ``grad_block_k``) cuts a rank's ``local_rows`` into blocks that
    tile one layout chunk (``local_rows // 2`` rows); ``{}`` (its defaults) when the chunk is
    not a positive multiple of ``impl.tile`` or ``impl`` does not work by blocks.

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
    block_k = impl.grad_block_k if for_grads and impl.grad_block_k else impl.block_k
    return {"block_q": math.gcd(chunk, impl.block_q), "block_k": math.gcd(chunk, block_k)}


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
    positions and segments that travel with the rows. (A past given as layer views is read in
    place where it stays, pass-Q; it is materialised where it travels.)
    """
    check_choice("context-parallel strategy", strategy, STRATEGIES)

    def plan(q, k, v, positions, segments, past, window=None):
        blocks = chunk_blocks(impl, q.shape[0])
        step_attend = functools.partial(impl.attend, **blocks)
        parts = kv_parts(k, v, positions, segments, past)
        if n == 1:
            out, lse = attend_parts(step_attend, q, positions, segments, parts, window)
            return out.astype(q.dtype), lse
        if strategy != "pass_q":
            parts = materialized_parts(parts)
        ring = _RINGS[strategy]
        if strategy in _EXACT_GRAD_RINGS and impl.grads is not None:
            grad_blocks = chunk_blocks(impl, q.shape[0], for_grads=True)
            step_grads = functools.partial(impl.grads, **grad_blocks)
            ring = functools.partial(_EXACT_GRAD_RINGS[strategy], step_grads)
        return ring(step_attend, axis, n, q, positions, segments, parts, window)

    return plan
