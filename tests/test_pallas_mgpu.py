"""The Hopper (Pallas Mosaic GPU) flash kernel against the reference attend.

On CPU it runs in the Mosaic GPU interpreter, which simulates shared memory, TMA copies and
barriers (and checks that every barrier is used consistently); its two matmuls are ``jnp.dot``
there (see the kernel's docstring), and ``tests/test_kernel_lowering.py`` lowers the compiled
form for CUDA. Inputs are bf16/fp16; the reference runs in fp32 on the same (rounded) values, so
the LSE must agree to fp32 accuracy and the output to the rounding of ``P`` and of the output
to bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpjax.attention import reference
from cpjax.attention.masks import visible_block_schedule
from cpjax.dispatch import get_attention
from cpjax.errors import CpjaxError
from pallas_kernels import flash_attention_mgpu
from tests.test_attention import CASES, _layout, _random_qkv, assert_attention_close

OUT_TOL = 2e-2  # bf16 P and bf16 output: ~2^-8 relative each


def _rounded(dtype, *arrays):
    """The arrays in ``dtype`` and their exact fp32 values."""
    low = [jnp.asarray(a, dtype) for a in arrays]
    return low, [np.asarray(a, np.float32) for a in low]


def _check(out, lse, want_out, want_lse):
    assert_attention_close(out, lse, want_out, want_lse, atol=OUT_TOL, lse_tol=2e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_on_every_layout(name):
    """Causal, Tq != Tk, packed segments, ring blocks wholly in the future / past, padding and
    queries that see nothing; every length padded to the 64-row blocks."""
    tq, tk, hq, hkv, _, kind = CASES[name]
    rng = np.random.default_rng(len(name))
    (q, k, v), exact = _rounded(jnp.bfloat16, *_random_qkv(rng, tq, tk, hq, hkv, 64))
    layout = [np.asarray(a, np.int32) for a in _layout(kind, tq, tk, rng)]
    got = flash_attention_mgpu(q, k, v, *layout, interpret=True)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    _check(*got, *reference.attend(*exact, *layout))


@pytest.mark.parametrize(
    "group, head_dim, dtype, block_k, slots, window",
    [
        (4, 128, jnp.bfloat16, 64, 2, 40),
        (8, 64, jnp.float16, 128, 3, None),
        (3, 64, jnp.bfloat16, 64, 1, None),
    ],
)
def test_gqa_head_dims_dtypes_slots_and_window(group, head_dim, dtype, block_k, slots, window):
    """More key blocks than slots (the slot refills), GQA 3/4/8, head_dim 64/128, fp16."""
    rng = np.random.default_rng(group * head_dim)
    (q, k, v), exact = _rounded(dtype, *_random_qkv(rng, 100, 300, group * 2, 2, head_dim))
    q_pos, kv_pos = np.arange(200, 300, dtype=np.int32), np.arange(300, dtype=np.int32)
    q_seg, kv_seg = np.zeros(100, np.int32), np.zeros(300, np.int32)
    got = flash_attention_mgpu(
        q,
        k,
        v,
        q_pos,
        kv_pos,
        q_seg,
        kv_seg,
        block_k=block_k,
        slots=slots,
        window=window,
        interpret=True,
    )
    _check(*got, *reference.attend(*exact, q_pos, kv_pos, q_seg, kv_seg, window=window))


def test_visit_lists_hold_exactly_the_blocks_that_may_be_seen():
    """Causal: query block i visits key blocks 0..i; a block wholly in the future: none."""
    pos = np.arange(256, dtype=np.int32)
    seg = np.zeros(256, np.int32)
    blocks, counts = visible_block_schedule(pos, pos, seg, seg, 64, 64)
    np.testing.assert_array_equal(counts, [1, 2, 3, 4])
    for i in range(4):
        np.testing.assert_array_equal(blocks[i, : i + 1], np.arange(i + 1))
        assert sorted(np.asarray(blocks[i])) == [0, 1, 2, 3]
    _, counts = visible_block_schedule(pos, pos + 1000, seg, seg, 64, 64)
    np.testing.assert_array_equal(counts, [0, 0, 0, 0])
    padded = np.where(pos < 64, 0, -1).astype(np.int32)  # only the first block is real
    _, counts = visible_block_schedule(pos + 1000, pos, seg, padded, 64, 64)
    np.testing.assert_array_equal(counts, [1, 1, 1, 1])


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("strategy", ["pass_kv", "pass_q"])
def test_rings_with_the_mgpu_kernel_match_reference_on_1_2_4_8_ranks(strategy, n):
    """pass-KV and pass-Q over n ranks of a load-balanced layout of two packed sequences.

    The ranks are emulated by ``jax.vmap`` over the context axis name (``ppermute`` included):
    the Mosaic GPU interpreter keeps one global model of GPU memory and its end-of-kernel check
    fails when kernels run concurrently on fake CPU devices, so a ``shard_map`` mesh cannot run
    it. The ring code is the same; ``tests/test_pallas_kernels.py`` runs the Triton kernel on a
    real 8-device mesh.
    """
    from cpjax.parallel.layout import balanced_layout
    from cpjax.parallel.mesh import CONTEXT
    from cpjax.parallel.ring import ring_attention

    layout = balanced_layout([200, 75], n)
    rng = np.random.default_rng(0)
    (q, k, v), (qf, kf, vf) = _rounded(
        jnp.bfloat16, *(rng.standard_normal((layout.total, h, 64)) for h in (4, 2, 2))
    )
    pos, seg = layout.unshard(layout.positions), layout.unshard(layout.segments)
    want = reference.attend(qf, kf, vf, pos, pos, seg, seg)

    plan = ring_attention(strategy, get_attention("pallas_mgpu"), CONTEXT, n)
    per_rank = lambda x: jnp.asarray(layout.shard(x)).reshape(n, -1, *x.shape[1:])  # noqa: E731
    out, lse = jax.jit(jax.vmap(lambda *a: plan(*a, None), axis_name=CONTEXT))(
        per_rank(q),
        per_rank(k),
        per_rank(v),
        layout.positions.reshape(n, -1),
        layout.segments.reshape(n, -1),
    )
    out = layout.unshard(np.asarray(out, np.float32).reshape(-1, 4, 64))
    lse = layout.unshard(np.asarray(lse).reshape(-1, 4))
    _check(out, lse, *want)


def test_engine_with_pallas_mgpu_matches_the_reference_engine_in_bf16():
    """``attention="pallas_mgpu"`` through the model (a 150-token prefill, head_dim 64) against
    the reference engine, both in bf16."""
    import dataclasses

    from cpjax.config import PRESETS
    from cpjax.engine import Engine
    from cpjax.model.decoder import init_params

    cfg = dataclasses.replace(PRESETS["tiny"], head_dim=64)
    params = init_params(cfg, 0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 150).astype(np.int32)
    got = Engine(cfg, params, dtype=jnp.bfloat16, attention="pallas_mgpu").logits(ids)
    want = Engine(cfg, params, dtype=jnp.bfloat16, attention="reference").logits(ids)
    assert np.abs(got - want).max() <= 1e-2 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(dtype=np.float32), "bf16 or fp16"),
        (dict(head_dim=32), "multiple of 64"),
        (dict(block_k=96), "block_k=96"),
        (dict(slots=0), "slots=0"),
    ],
)
def test_inputs_the_kernel_cannot_take_are_clear_errors(change, match):
    head_dim = change.pop("head_dim", 64)
    dtype = change.pop("dtype", jnp.bfloat16)
    q = jnp.zeros((64, 2, head_dim), dtype)
    pos, seg = np.arange(64, dtype=np.int32), np.zeros(64, np.int32)
    with pytest.raises(CpjaxError, match=match):
        flash_attention_mgpu(q, q, q, pos, pos, seg, seg, interpret=True, **change)


# ------------------------------------------------------------- compiled on a Hopper GPU
def _on_hopper() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return float(getattr(jax.devices()[0], "compute_capability", 0) or 0) >= 9.0


requires_hopper = pytest.mark.skipif(
    not _on_hopper(),
    reason="compiles the Mosaic GPU kernel: needs a Hopper (sm_90+) GPU (experiments/gpu_check.sh)",
)


def _reference_highest(exact, *layout, window=None):
    with jax.default_matmul_precision("highest"):
        return jax.device_get(reference.attend(*exact, *layout, window=window))


@requires_hopper
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_matches_reference_on_every_layout_on_hopper(name):
    tq, tk, hq, hkv, _, kind = CASES[name]
    rng = np.random.default_rng(len(name))
    (q, k, v), exact = _rounded(jnp.bfloat16, *_random_qkv(rng, tq, tk, hq, hkv, 64))
    layout = [np.asarray(a, np.int32) for a in _layout(kind, tq, tk, rng)]
    got = flash_attention_mgpu(q, k, v, *layout, interpret=False)
    _check(*got, *_reference_highest(exact, *layout))


@requires_hopper
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize(
    "t, block_k, slots, window", [(1000, 64, 2, None), (4097, 128, 3, None), (1000, 64, 2, 256)]
)
def test_compiled_at_model_shapes_on_hopper(hq, hkv, d, t, block_k, slots, window):
    rng = np.random.default_rng(t + d)
    (q, k, v), exact = _rounded(jnp.bfloat16, *_random_qkv(rng, t, t, hq, hkv, d))
    pos, seg = np.arange(t, dtype=np.int32), np.zeros(t, np.int32)
    got = flash_attention_mgpu(
        q, k, v, pos, pos, seg, seg, block_k=block_k, slots=slots, window=window, interpret=False
    )
    _check(*got, *_reference_highest(exact, pos, pos, seg, seg, window=window))
