"""attend implementations against the dense reference; merge algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpjax.attention import blockwise, cudnn, masks, merge, reference
from cpjax.attention.layer_view import LayerView
from cpjax.dispatch import get_attend
from cpjax.errors import CpjaxError


def _random_qkv(rng, tq, tk, hq, hkv, d, dtype=np.float32):
    q = rng.standard_normal((tq, hq, d)).astype(dtype)
    k = rng.standard_normal((tk, hkv, d)).astype(dtype)
    v = rng.standard_normal((tk, hkv, d)).astype(dtype)
    return q, k, v


def _naive(q, k, v, mask):
    """Per-head loop in numpy float64: the definition of masked softmax attention."""
    tq, hq, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros((tq, hq, d))
    lse = np.full((tq, hq), -np.inf)
    for h in range(hq):
        s = q[:, h].astype(np.float64) @ k[:, h // group].astype(np.float64).T / np.sqrt(d)
        for i in range(tq):
            if mask[i].any():
                row = s[i][mask[i]]
                m = row.max()
                lse[i, h] = m + np.log(np.exp(row - m).sum())
                p = np.exp(s[i] - lse[i, h]) * mask[i]
                out[i, h] = p @ v[:, h // group]
    return out, lse


def test_reference_equals_naive_definition():
    rng = np.random.default_rng(0)
    q, k, v = _random_qkv(rng, 9, 13, 6, 2, 8)
    q_pos = np.arange(4, 13, dtype=np.int32)
    kv_pos = np.arange(13, dtype=np.int32)
    q_seg = np.array([0, 0, 0, 1, 1, 1, 1, -1, 0], np.int32)
    kv_seg = np.array([0] * 6 + [1] * 6 + [-1], np.int32)
    mask = np.asarray(masks.visibility_mask(q_pos, kv_pos, q_seg, kv_seg))
    out, lse = reference.attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    want_out, want_lse = _naive(q, k, v, mask)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    assert np.all(np.asarray(out)[7] == 0) and np.all(np.isneginf(np.asarray(lse)[7]))


CASES = {
    # name: (tq, tk, hq, hkv, d, layout)
    "causal_mha": (37, 37, 4, 4, 16, "causal"),
    "causal_gqa3": (50, 50, 9, 3, 8, "causal"),
    "gqa4_tq_ne_tk": (21, 70, 8, 2, 16, "suffix"),
    "gqa8_packed": (64, 64, 8, 1, 8, "packed"),
    "ring_future_block": (16, 24, 4, 2, 8, "future"),
    "ring_past_block": (16, 24, 4, 2, 8, "past"),
    "padding_and_blind_queries": (30, 30, 4, 2, 8, "padded"),
}


def _layout(kind, tq, tk, rng):
    if kind == "causal":
        return (np.arange(tq), np.arange(tk), np.zeros(tq), np.zeros(tk))
    if kind == "suffix":  # queries are the last tq of tk tokens (a cached prefix)
        return (np.arange(tk - tq, tk), np.arange(tk), np.zeros(tq), np.zeros(tk))
    if kind == "packed":  # three sequences packed in one row, shuffled order
        seg = np.repeat([0, 1, 2], [20, 30, 14])
        pos = np.concatenate([np.arange(20), np.arange(30), np.arange(14)])
        perm = rng.permutation(tq)
        return (pos[perm], pos, seg[perm], seg)
    if kind == "future":  # every key lies after every query: nothing visible
        return (np.arange(tq), np.arange(100, 100 + tk), np.zeros(tq), np.zeros(tk))
    if kind == "past":  # every key lies before every query: all visible
        return (np.arange(100, 100 + tq), np.arange(tk), np.zeros(tq), np.zeros(tk))
    if kind == "padded":  # padding keys and queries; queries of a segment with no keys
        q_seg = np.array([0] * 20 + [5] * 5 + [-1] * 5)
        kv_seg = np.array([0] * 24 + [-1] * 6)
        return (np.arange(tq), np.arange(tk), q_seg, kv_seg)
    raise ValueError(kind)


def case_inputs(name):
    """``(q, k, v, [q_pos, kv_pos, q_seg, kv_seg])`` of the test case ``name``."""
    tq, tk, hq, hkv, d, kind = CASES[name]
    rng = np.random.default_rng(len(name))
    q, k, v = _random_qkv(rng, tq, tk, hq, hkv, d)
    return q, k, v, [np.asarray(a, np.int32) for a in _layout(kind, tq, tk, rng)]


def assert_attention_close(out, lse, want_out, want_lse, atol=1e-5, lse_tol=None):
    """Outputs close, no NaN, ``-inf`` LSE exactly where the reference has it, finite LSEs close
    (within ``atol``, or within ``lse_tol`` absolute and relative when it is given)."""
    out = np.asarray(out, np.float32)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, want_out, atol=atol, rtol=atol)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    lse_close = dict(atol=atol) if lse_tol is None else dict(atol=lse_tol, rtol=lse_tol)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], **lse_close)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("blocks", [(8, 8), (16, 5), (512, 512)])
def test_blockwise_matches_reference(name, blocks):
    q, k, v, layout = case_inputs(name)
    fn = jax.jit(lambda *a: blockwise.attend(*a, block_q=blocks[0], block_k=blocks[1]))
    assert_attention_close(*fn(q, k, v, *layout), *reference.attend(q, k, v, *layout))


@pytest.mark.parametrize("window", [None, 100])
def test_blockwise_attends_half_key_blocks_on_the_causal_diagonal(window):
    """Key blocks twice the query blocks: a query block on the causal diagonal sees only the
    first half of the key block there, and attends to that half alone; two documents packed
    (the second starts inside a key block), with and without a sliding window."""
    rng = np.random.default_rng(7)
    n = 300
    q, k, v = _random_qkv(rng, n, n, 4, 2, 8)
    seg = (np.arange(n) >= 170).astype(np.int32)
    pos = np.where(seg == 0, np.arange(n), np.arange(n) - 170).astype(np.int32)
    got = blockwise.attend(
        q, k, v, pos, pos, seg, seg, window=window, block_q=blockwise.MIN_HALF_BLOCK,
        block_k=2 * blockwise.MIN_HALF_BLOCK,
    )  # fmt: skip
    assert_attention_close(*got, *reference.attend(q, k, v, pos, pos, seg, seg, window=window))


def test_blockwise_sliding_window_and_bf16():
    rng = np.random.default_rng(3)
    q, k, v = _random_qkv(rng, 40, 40, 4, 2, 16)
    pos, seg = np.arange(40, dtype=np.int32), np.zeros(40, np.int32)
    want, want_lse = reference.attend(q, k, v, pos, pos, seg, seg, window=7)
    out, lse = blockwise.attend(q, k, v, pos, pos, seg, seg, window=7, block_q=8, block_k=8)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out_bf16, _ = blockwise.attend(qb, kb, vb, pos, pos, seg, seg, block_q=8, block_k=8)
    want_full, _ = reference.attend(q, k, v, pos, pos, seg, seg)
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_bf16, np.float32), want_full, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("impl, block_k", [("blockwise", 8), ("blockwise", 7), ("reference", 7)])
def test_layer_view_of_a_stacked_cache_equals_the_sliced_layer(name, impl, block_k):
    """Keys/values read in place from layer 1 of a 3-layer stack (the block reader of
    ``blockwise``, whose last block overlaps the one before when ``block_k`` does not divide
    ``Tk``; a materialised copy for the others) give exactly the slice's result."""
    q, k, v, layout = case_inputs(name)
    rng = np.random.default_rng(7)
    k_stack = np.stack([rng.standard_normal(k.shape).astype(np.float32), k, k[::-1]])
    v_stack = np.stack([v[::-1], v, rng.standard_normal(v.shape).astype(np.float32)])
    attend = get_attend(impl)

    @jax.jit
    def on_views(q, k_stack, v_stack, layer, *layout):
        views = (LayerView(k_stack, layer), LayerView(v_stack, layer))
        return attend(q, *views, *layout, window=9, block_q=8, block_k=block_k)

    got = on_views(q, k_stack, v_stack, jnp.int32(1), *layout)
    want = attend(q, k, v, *layout, window=9, block_q=8, block_k=block_k)
    assert_attention_close(*got, *want, atol=1e-6)


@pytest.mark.parametrize("split", [0, 1, 7, 19, 20])
def test_merge_of_disjoint_key_sets_equals_attention_over_union(split):
    rng = np.random.default_rng(split)
    q, k, v = _random_qkv(rng, 12, 20, 6, 3, 8)
    q_pos, kv_pos = np.arange(8, 20, dtype=np.int32), rng.permutation(20).astype(np.int32)
    q_seg, kv_seg = np.zeros(12, np.int32), np.zeros(20, np.int32)
    want_out, want_lse = reference.attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    a = reference.attend(q, k[:split], v[:split], q_pos, kv_pos[:split], q_seg, kv_seg[:split])
    b = reference.attend(q, k[split:], v[split:], q_pos, kv_pos[split:], q_seg, kv_seg[split:])
    out, lse = merge(*a, *b)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)


def test_merge_of_two_empty_parts_is_zero_not_nan():
    out = jnp.ones((3, 2, 4))
    lse = jnp.full((3, 2), -jnp.inf)
    merged, merged_lse = merge(out * 0, lse, out * 0, lse)
    assert np.all(np.asarray(merged) == 0) and np.all(np.isneginf(merged_lse))


def test_unknown_attention_impl_is_a_clear_error():
    with pytest.raises(CpjaxError, match="unknown attention implementation 'flash2'"):
        get_attend("flash2")


@pytest.mark.parametrize("name", sorted(CASES))
def test_cudnn_wrapper_matches_reference_through_xla(name):
    """The cuDNN path's mask/LSE handling, run through jax.nn's XLA implementation on CPU."""
    q, k, v, layout = case_inputs(name)
    assert_attention_close(
        *cudnn.attend(q, k, v, *layout, implementation="xla"), *reference.attend(q, k, v, *layout)
    )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_cudnn_without_gpu_is_a_clear_error():
    q = np.zeros((2, 2, 8), np.float32)
    pos, seg = np.arange(2, dtype=np.int32), np.zeros(2, np.int32)
    with pytest.raises(CpjaxError, match="'cudnn' needs an NVIDIA GPU"):
        get_attend("cudnn")(q, q, q, pos, pos, seg, seg)


@pytest.mark.parametrize("name", ["reference", "blockwise", "pallas"])
def test_attend_inputs_in_another_order_are_a_clear_error(name):
    """The contract order is (q, k, v, q_pos, kv_pos, q_seg, kv_seg): key positions where the
    query positions go are caught at the entry point (chex), named as a ``CpjaxError``."""
    q, k, v, (q_pos, kv_pos, q_seg, kv_seg) = case_inputs("gqa4_tq_ne_tk")
    with pytest.raises(CpjaxError, match="attention inputs"):
        get_attend(name)(q, k, v, kv_pos, kv_seg, q_pos, q_seg)
    with pytest.raises(CpjaxError, match="attention inputs"):
        get_attend(name)(q, k, v, q_pos.astype(np.float32), kv_pos, q_seg, kv_seg)
