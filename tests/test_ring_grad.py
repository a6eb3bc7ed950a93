"""Gradients through the log-sum-exp merges and the context-parallel rings.

With an implementation that has a backward (``AttentionImpl.grads``: blockwise), pass-KV and
pass-Q use their hand-written backward rings (``ring.pass_kv_exact_grad``,
``ring.pass_q_exact_grad``), which keep only each rank's inputs and merged result. Without
one, and for all-gather, the rings are differentiated by autodiff through ``shard_map``: the
transpose of ``ppermute`` is the reverse ``ppermute``, of ``all_to_all`` an ``all_to_all``, of
``all_gather`` a reduce-scatter; each step's ``attend`` is the blockwise one with its
flash-style backward. Both are checked against single-device autodiff of the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpjax.attention import blockwise, reference
from cpjax.attention.masks import PAD_SEGMENT
from cpjax.attention.merge import merge, merge_stacked
from cpjax.attention.plans import PastKV
from cpjax.dispatch import get_attention
from cpjax.parallel.layout import balanced_layout
from cpjax.parallel.mesh import CONTEXT, make_mesh
from cpjax.parallel.ring import STRATEGIES, ring_attention
from tests.test_attention import _random_qkv
from tests.test_attention_grad import assert_grads_close

HQ, HKV, D = 4, 2, 8


def _lse_term(lse, w):
    return jnp.sum(jnp.where(jnp.isfinite(lse), lse * w, 0.0))


@pytest.mark.parametrize("split", [1, 5, 12, 19])
def test_grad_through_merge_equals_grad_over_the_union(split):
    """Causal attention of 12 queries over 20 keys, split at ``split`` into two partials,
    merged and (the same partials) stacked: the gradient of a loss of ``(out, lse)`` wrt q, k,
    v is the one of attention over the union. The later keys are invisible to the first
    ``split`` queries (their partial has ``lse = -inf``), all of them when ``split >= 12``."""
    rng = np.random.default_rng(split)
    q, k, v = _random_qkv(rng, 12, 20, HQ, HKV, D)
    q_pos, kv_pos = np.arange(12, dtype=np.int32), np.arange(20, dtype=np.int32)
    q_seg, kv_seg = np.zeros(12, np.int32), np.zeros(20, np.int32)
    w_out = rng.standard_normal(q.shape).astype(np.float32)
    w_lse = rng.standard_normal(q.shape[:2]).astype(np.float32)

    def parts(q, k, v):
        attend = lambda s: blockwise.attend(  # noqa: E731
            q, k[s], v[s], q_pos, kv_pos[s], q_seg, kv_seg[s], block_q=8, block_k=8
        )
        return attend(slice(0, split)), attend(slice(split, None))

    def loss_of(combine):
        def loss(q, k, v):
            out, lse = combine(*parts(q, k, v))
            return jnp.sum(out * w_out) + _lse_term(lse, w_lse)

        return loss

    def union(q, k, v):
        out, lse = reference.attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        return jnp.sum(out * w_out) + _lse_term(lse, w_lse)

    def stacked(a, b):
        return merge_stacked(*(jnp.stack(x) for x in zip(a, b)))

    want = jax.grad(union, argnums=(0, 1, 2))(q, k, v)
    for combine in (lambda a, b: merge(*a, *b), stacked):
        got = jax.jit(jax.grad(loss_of(combine), argnums=(0, 1, 2)))(q, k, v)
        assert_grads_close([np.asarray(g) for g in got], [np.asarray(w) for w in want])


# ---------------------------------------------------------------------------- rings
LENGTHS = (29, 18)  # packed; neither a multiple of 2N for N > 1
STARTS = (0, 5)  # the second sequence continues at position 5 (its first tokens are cached)
BACKWARDS = ("hand", "autodiff")
PAST = 6  # cache rows per rank: the second sequence's positions 0..4, and padding


def _impl(backward: str):
    """Blockwise attention, with its ``grads`` (hand-written ring backward) or without
    (autodiff of the rings)."""
    impl = get_attention("blockwise")
    return impl if backward == "hand" else impl._replace(grads=None)


def _ring_grad_fn(strategy, n, weights, backward="hand"):
    """``grad`` wrt ``(q, k, v, past_k, past_v)`` of a loss of the ring's ``(out, lse)`` on
    the sharded row (``jit(grad(shard_map(ring)))`` over N fake CPU devices)."""
    plan = ring_attention(strategy, _impl(backward), CONTEXT, n)
    w_out, w_lse = weights

    def local(q, k, v, pos, seg, pk, pv, ppos, pseg):
        return plan(q, k, v, pos, seg, PastKV(pk, pv, ppos, pseg))

    row = P(CONTEXT)
    ring = jax.shard_map(
        local, mesh=make_mesh(n), in_specs=(row,) * 9, out_specs=(row, row), check_vma=False
    )

    def loss(q, k, v, pk, pv, pos, seg, ppos, pseg):
        out, lse = ring(q, k, v, pos, seg, pk, pv, ppos, pseg)
        return jnp.sum(out * w_out) + _lse_term(lse, w_lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _cache(n, rng):
    """Per-rank cache shards of ``PAST`` rows: the 5 cached tokens of sequence 1 spread over
    the ranks, the other rows empty (segment -1)."""
    pos = np.zeros(n * PAST, np.int32)
    seg = np.full(n * PAST, PAD_SEGMENT, np.int32)
    slots = rng.permutation(n * PAST)[: STARTS[1]]
    pos[slots], seg[slots] = np.arange(STARTS[1]), 1
    pk, pv = rng.standard_normal((2, n * PAST, HKV, D)).astype(np.float32)
    return pk, pv, pos, seg


HAND_WRITTEN = ("pass_kv", "pass_q")  # all-gather is always differentiated by autodiff
RING_CASES = [
    (strategy, backward)
    for strategy in STRATEGIES
    for backward in (BACKWARDS if strategy in HAND_WRITTEN else ("autodiff",))
]


@pytest.mark.parametrize("strategy, backward", RING_CASES)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ring_grad_equals_single_device_reference_grad(n, strategy, backward):
    """A packed row of two sequences (29 and 18 tokens, padded per chunk for N > 1), the
    second one continuing 5 cached tokens spread over the ranks' cache shards: the gradient
    wrt queries, keys, values and cached keys/values equals the single-device reference
    autodiff (1e-5), and padding slots get zero gradient."""
    rng = np.random.default_rng(n)
    layout = balanced_layout(list(LENGTHS), n, list(STARTS), [0, 1])
    total = sum(LENGTHS)
    q, k, v = _random_qkv(rng, total, total, HQ, HKV, D)
    pk, pv, ppos, pseg = _cache(n, rng)
    w_out = rng.standard_normal(q.shape).astype(np.float32)
    w_lse = rng.standard_normal(q.shape[:2]).astype(np.float32)
    pos = np.concatenate([s + np.arange(t) for s, t in zip(STARTS, LENGTHS)]).astype(np.int32)
    seg = np.repeat([0, 1], LENGTHS).astype(np.int32)

    def reference_loss(q, k, v, pk, pv):
        out, lse = reference.attend(
            q,
            jnp.concatenate([k, pk]),
            jnp.concatenate([v, pv]),
            pos,
            np.concatenate([pos, ppos]),
            seg,
            np.concatenate([seg, pseg]),
        )
        return jnp.sum(out * w_out) + _lse_term(lse, w_lse)

    want = jax.grad(reference_loss, argnums=(0, 1, 2, 3, 4))(q, k, v, pk, pv)

    sharded = [layout.shard(x) for x in (q, k, v)]
    grad = _ring_grad_fn(strategy, n, (layout.shard(w_out), layout.shard(w_lse)), backward)
    got = grad(*sharded, pk, pv, layout.positions, layout.segments, ppos, pseg)
    padding = layout.source < 0
    assert n == 1 or padding.any()
    for g in got[:3]:
        assert (np.asarray(g)[padding] == 0).all()
    got = [layout.unshard(np.asarray(g)) for g in got[:3]] + [np.asarray(g) for g in got[3:]]
    assert_grads_close(got, [np.asarray(w) for w in want])


def _residual_bytes_per_rank(strategy, n, backward, rows=1024):
    """Bytes a ring's VJP keeps from the forward for the backward, per rank: causal attention
    of ``rows`` tokens (4 query heads, 2 KV heads, D 64) on N ranks."""
    rng = np.random.default_rng(0)
    q, k, v = _random_qkv(rng, rows, rows, HQ, HKV, 64)
    pos, seg = np.arange(rows, dtype=np.int32), np.zeros(rows, np.int32)
    plan = ring_attention(strategy, _impl(backward), CONTEXT, n)
    row = P(CONTEXT)
    ring = jax.shard_map(
        lambda q, k, v, pos, seg: plan(q, k, v, pos, seg, None),
        mesh=make_mesh(n),
        in_specs=(row,) * 5,
        out_specs=(row, row),
        check_vma=False,
    )

    def residuals(q, k, v):
        return jax.tree.leaves(jax.vjp(lambda q, k, v: ring(q, k, v, pos, seg), q, k, v)[1])

    shapes = jax.eval_shape(residuals, q, k, v)  # traced only: global shapes of the residuals
    return sum(np.prod(x.shape) * x.dtype.itemsize for x in shapes) / n


@pytest.mark.parametrize("strategy", HAND_WRITTEN)
def test_hand_written_ring_backward_keeps_one_nth_per_rank(strategy):
    """What the VJP keeps between forward and backward (each rank's inputs, merged ``out`` and
    ``lse``) shrinks as 1/N with the hand-written backward: at N = 8, 1/8 of N = 1. Autodiff
    of the same ring keeps every step's K/V or query block and partial result: no less at
    N = 8 than at N = 1."""
    single = _residual_bytes_per_rank(strategy, 1, "hand")
    assert _residual_bytes_per_rank(strategy, 8, "hand") == pytest.approx(single / 8, rel=0.01)
    assert _residual_bytes_per_rank(strategy, 8, "autodiff") >= single
