"""Sliding windows: the edge cases of the visibility rule against a brute-force oracle, and ring
steps outside every window skipped (not masked), counted at run time."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpjax.attention import blockwise, reference
from cpjax.attention.masks import visibility_mask
from cpjax.attention.plans import skipping_invisible
from cpjax.dispatch import AttentionImpl, get_attend
from cpjax.parallel.layout import attended_ring_steps, balanced_layout
from cpjax.parallel.mesh import CONTEXT, make_mesh
from cpjax.parallel.ring import ring_attention
from tests.test_attention import assert_attention_close


def _brute_force(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window):
    """Attention by the rule written out per pair, in float64 (the oracle)."""
    tq, hq, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros((tq, hq, d))
    lse = np.full((tq, hq), -np.inf)
    for i, h in itertools.product(range(tq), range(hq)):
        seen = [
            j
            for j in range(k.shape[0])
            if q_seg[i] >= 0
            and kv_seg[j] == q_seg[i]
            and kv_pos[j] <= q_pos[i]
            and q_pos[i] - kv_pos[j] < window
        ]
        if not seen:
            continue
        scores = np.array([q[i, h] @ k[j, h // group] for j in seen], np.float64) / np.sqrt(d)
        lse[i, h] = np.logaddexp.reduce(scores)
        out[i, h] = np.exp(scores - lse[i, h]) @ v[seen, h // group]
    return out, lse


def _packed(lengths, pad=0):
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(pad, -1)])
    return pos.astype(np.int32), seg.astype(np.int32)


CASES = {
    "window 1: only itself": ([23], 0, 1),
    "key exactly W back is hidden": ([23], 0, 7),
    "segment boundary inside the window": ([9, 14], 0, 12),
    "packed with padding": ([5, 11, 7], 3, 4),
    "window longer than the sequence": ([19], 2, 100),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_window_edge_cases_equal_the_rule_written_out(name, impl):
    lengths, pad, window = CASES[name]
    pos, seg = _packed(lengths, pad)
    rng = np.random.default_rng(len(name))
    q, k, v = (rng.standard_normal((pos.size, h, 8)).astype(np.float32) for h in (4, 2, 2))
    want = _brute_force(q, k, v, pos, pos, seg, seg, window)
    blocks = {"block_q": 8, "block_k": 8} if impl == "blockwise" else {}
    got = get_attend(impl)(q, k, v, pos, pos, seg, seg, window=window, **blocks)
    assert_attention_close(np.asarray(got[0]), np.asarray(got[1]), *want, atol=1e-5)


def test_the_rule_at_the_window_edge():
    """A key exactly W positions back is hidden, W - 1 back is seen (HF's convention)."""
    q_pos, q_seg = jnp.asarray([10]), jnp.asarray([0])
    kv_pos, kv_seg = jnp.asarray([3, 4, 10, 11]), jnp.asarray([0, 0, 0, 0])
    mask = visibility_mask(q_pos, kv_pos, q_seg, kv_seg, window=7)
    assert np.asarray(mask).tolist() == [[False, True, True, False]]


def test_ring_steps_outside_the_window_run_no_attention():
    """pass-KV over 8 ranks, window = one layout chunk: each rank's attention runs only at the
    steps whose keys its chunks can see (counted by a callback inside the attention), the rest
    are skipped; the result equals the reference."""
    n, length, window = 8, 16 * 24, 24
    layout = balanced_layout([length], n)
    calls = []

    def counting_attend(*args, **kw):
        jax.debug.callback(lambda: calls.append(1))
        return blockwise.attend(*args, **kw)

    impl = AttentionImpl("counting", skipping_invisible(counting_attend), 8, 8, 8)
    plan = ring_attention("pass_kv", impl, CONTEXT, n)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((length, h, 16)), jnp.float32) for h in (2, 1, 1))
    ranks = P(CONTEXT)
    ring = jax.shard_map(
        lambda *a: plan(*a, None, window=window),
        mesh=make_mesh(n),
        in_specs=ranks,
        out_specs=ranks,
        check_vma=False,
    )
    out, lse = jax.jit(ring)(
        *(jnp.asarray(layout.shard(x)) for x in (q, k, v)),
        jnp.asarray(layout.positions),
        jnp.asarray(layout.segments),
    )
    jax.effects_barrier()
    expected = attended_ring_steps(layout, window)
    assert len(calls) == expected.sum() == 22  # of 64 (rank, step) pairs: 42 skipped
    pos, seg = layout.unshard(layout.positions), layout.unshard(layout.segments)
    want = reference.attend(q, k, v, pos, pos, seg, seg, window=window)
    got_out = layout.unshard(np.asarray(out))
    got_lse = layout.unshard(np.asarray(lse))
    assert_attention_close(got_out, got_lse, *map(np.asarray, want), atol=1e-5)
