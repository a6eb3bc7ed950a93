"""Pallas kernels (interpret mode on CPU, compiled on GPU) against the reference attend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpjax.attention import blockwise, reference
from cpjax.dispatch import pallas_attend
from pallas_kernels import decode_attention, flash_attention, flash_attention_grads
from tests.test_attention import CASES, _random_qkv, assert_attention_close, case_inputs
from tests.test_attention_grad import assert_grads_close, qkv_grads

_check = assert_attention_close


@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_attention_matches_reference(name):
    q, k, v, layout = case_inputs(name)
    got = flash_attention(q, k, v, *layout, block_q=16, block_k=16, interpret=True)
    _check(*got, *reference.attend(q, k, v, *layout), atol=1e-5)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_attention_gqa_and_head_dims_with_window(group, head_dim):
    rng = np.random.default_rng(group * head_dim)
    q, k, v = _random_qkv(rng, 45, 70, group * 2, 2, head_dim)
    q_pos, kv_pos = np.arange(25, 70, dtype=np.int32), np.arange(70, dtype=np.int32)
    q_seg, kv_seg = np.zeros(45, np.int32), np.zeros(70, np.int32)
    want = reference.attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=20)
    got = flash_attention(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=20, block_q=16, block_k=32, interpret=True
    )
    _check(*got, *want, atol=1e-5)


def test_flash_attention_bf16():
    rng = np.random.default_rng(11)
    q, k, v = _random_qkv(rng, 40, 40, 8, 2, 64)
    pos, seg = np.arange(40, dtype=np.int32), np.zeros(40, np.int32)
    want = reference.attend(q, k, v, pos, pos, seg, seg)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out, lse = flash_attention(
        qb, kb, vb, pos, pos, seg, seg, block_q=16, block_k=16, interpret=True
    )
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want[0], atol=3e-2, rtol=2e-2)
    np.testing.assert_allclose(lse, want[1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tq, group, n_splits", [(1, 3, 4), (2, 4, 3), (4, 1, 16)])
def test_decode_attention_matches_reference(tq, group, n_splits):
    rng = np.random.default_rng(tq * 10 + group)
    tk, hkv, d = 300, 2, 64
    q, k, v = _random_qkv(rng, tq, tk, group * hkv, hkv, d)
    kv_pos = np.arange(tk, dtype=np.int32)
    kv_seg = np.zeros(tk, np.int32)
    kv_seg[200:] = -1  # empty cache slots
    kv_seg[:9] = 4  # another sequence in the cache
    q_pos = np.arange(200 - tq, 200, dtype=np.int32)
    q_seg = np.zeros(tq, np.int32)
    want = reference.attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    got = decode_attention(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, n_splits=n_splits, block_k=32, interpret=True
    )
    _check(*got, *want, atol=1e-5)


# ------------------------------------------------------------------------------ backward
# Shapes: Hq 4, Hkv 2 (GQA), D 16; lengths that are not multiples of the 16-row blocks.
GRAD_CASES = {
    # name: (tq, tk, kind, window)
    "causal": (40, 40, "causal", None),
    "packed_padded_dead": (48, 48, "packed", None),
    "window_after_prefix": (29, 45, "suffix", 7),
}


def _grad_layout(kind, tq, tk):
    """``[q_pos, kv_pos, q_seg, kv_seg]`` int32. ``packed``: three sequences (20, 18, 4 rows)
    and 6 padding rows; the queries of the third see no key (its keys are padding)."""
    if kind == "causal":
        return [np.arange(tq), np.arange(tk), np.zeros(tq), np.zeros(tk)]
    if kind == "suffix":
        return [np.arange(tk - tq, tk), np.arange(tk), np.zeros(tq), np.zeros(tk)]
    pos = np.concatenate([np.arange(20), np.arange(18), np.arange(4), np.zeros(6)])
    q_seg = np.repeat([0, 1, 2, -1], [20, 18, 4, 6])
    kv_seg = np.where(q_seg == 2, -1, q_seg)
    return [pos, pos, q_seg, kv_seg]


def _grad_inputs(name, seed=0):
    """``(q, k, v, layout, window, out, lse, d_out, d_lse)`` of a :data:`GRAD_CASES` case:
    ``(out, lse)`` by the reference, random cotangents (NaN on the rows that see nothing)."""
    tq, tk, kind, window = GRAD_CASES[name]
    rng = np.random.default_rng(seed)
    q, k, v = _random_qkv(rng, tq, tk, 4, 2, 16)
    layout = [np.asarray(a, np.int32) for a in _grad_layout(kind, tq, tk)]
    out, lse = reference.attend(q, k, v, *layout, window=window)
    dead = np.isneginf(np.asarray(lse))
    d_out = np.where(dead[..., None], np.nan, rng.standard_normal(out.shape)).astype(np.float32)
    d_lse = np.where(dead, np.nan, rng.standard_normal(lse.shape)).astype(np.float32)
    return q, k, v, layout, window, out, lse, d_out, d_lse


@pytest.mark.parametrize(
    "name, blocks",
    [("causal", (16, 16)), ("packed_padded_dead", (32, 16)), ("window_after_prefix", (16, 32))],
)
def test_flash_attention_grads_match_attend_grads(name, blocks):
    """Causal GQA, packed segments with padding and queries that see nothing (NaN
    cotangents), a sliding window after a prefix; nonzero ``d_lse``: the kernels equal
    ``blockwise.attend_grads`` (1e-5) and give the dead rows no gradient."""
    q, k, v, layout, window, *result = _grad_inputs(name)
    got = flash_attention_grads(
        q, k, v, *layout, *result, window=window, block_q=blocks[0], block_k=blocks[1]
    )
    want = blockwise.attend_grads(q, k, v, *layout, *result, window=window, block_q=8, block_k=8)
    assert [g.dtype for g in got] == [jnp.float32] * 3
    assert_grads_close([np.asarray(g) for g in got], [np.asarray(w) for w in want])
    dead = np.isneginf(np.asarray(result[1]))
    assert dead.any() == (name == "packed_padded_dead")
    assert (np.asarray(got[0])[dead] == 0).all()


def test_flash_attention_grads_of_a_key_subset():
    """``(out, lse)`` over all 45 keys, gradients through keys 20..44 only: this key set's
    part of ``dq`` and its ``dk, dv``, as ``blockwise.attend_grads`` computes them."""
    q, k, v, (q_pos, kv_pos, q_seg, kv_seg), window, *result = _grad_inputs(
        "window_after_prefix", seed=1
    )
    part = (k[20:], v[20:], q_pos, kv_pos[20:], q_seg, kv_seg[20:])
    args = (q, *part[:2], *part[2:])
    got = flash_attention_grads(*args, *result, window=window, block_q=16, block_k=16)
    want = blockwise.attend_grads(*args, *result, window=window, block_q=8, block_k=8)
    assert_grads_close([np.asarray(g) for g in got], [np.asarray(w) for w in want])


@pytest.mark.parametrize("tq", [4, 40], ids=["decode_forward", "flash_forward"])
def test_grad_through_pallas_attend_equals_reference_autodiff(tq):
    """``jax.grad`` of a loss of ``(out, lse)`` through ``pallas_attend`` (its custom VJP:
    split-K decode or flash forward, the Pallas backward) equals autodiff of the reference."""
    rng = np.random.default_rng(tq)
    q, k, v = _random_qkv(rng, tq, 40, 4, 2, 16)
    layout = [np.arange(40 - tq, 40), np.arange(40), np.zeros(tq), np.zeros(40)]
    layout = [np.asarray(a, np.int32) for a in layout]
    got = qkv_grads(lambda *a: pallas_attend(*a, block_q=16, block_k=16), q, k, v, layout)
    assert_grads_close(got, qkv_grads(reference.attend, q, k, v, layout))


def test_rings_with_pallas_match_reference_on_8_devices(tiny_params):
    from cpjax.config import PRESETS
    from cpjax.engine import ContextParallel, Engine
    from cpjax.parallel.mesh import make_mesh

    cfg = PRESETS["tiny"]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 150).astype(np.int32)
    want = Engine(cfg, tiny_params, attention="reference").logits(ids)
    for strategy in ("pass_kv", "pass_q"):
        engine = Engine(
            cfg,
            tiny_params,
            ContextParallel(mesh=make_mesh(8), strategy=strategy),
            attention="pallas",
        )
        assert np.abs(engine.logits(ids) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_kernel_benchmark_script_runs_in_smoke_mode(tmp_path):
    import json

    from experiments.bench_kernels import main

    main(["--smoke", "--out", str(tmp_path / "k.json")])
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"pallas", "blockwise_xla", "pallas_decode"}
    assert all("error" not in r and r["seconds"] > 0 for r in rows)


# ----------------------------------------------------------------------- compiled on a GPU
# The kernels compiled by Triton (interpret=False) against the reference. They run where the
# default backend is a GPU (experiments/gpu_check.sh) and are skipped elsewhere; the CPU-side
# check of the same lowering is tests/test_kernel_lowering.py. Blocks are powers of two >= 16.
#
# Precision: a float32 jnp.dot inside a Pallas Triton kernel is a TF32 dot by default (the
# lowering maps Precision.DEFAULT to `tt.dot ... inputPrecision = tf32`; seen in the lowered IR,
# jax 0.10.2), and XLA's own fp32 matmuls on a GPU may use TF32 too. So each test fixes the
# precision itself: "highest" (IEEE fp32, kernel and reference) keeps the CPU tolerance 1e-5;
# the kernels' default, TF32, is compared with a "highest" reference at TF32_ATOL. A numpy
# emulation of TF32 rounding in both dots (q.k and p.v) on these shapes gives a worst error of
# about 1.2e-3 in |out - want| / (1 + |want|) and 1.1e-3 in the LSE; 4e-3 leaves a margin of 3.
# bf16 inputs are compared with the reference on the same bf16-rounded values in float32
# (emulated worst error 3.1e-3: p and the output are rounded to bf16).
requires_gpu = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="compiles the kernels with Triton (interpret=False): needs a GPU backend "
    "(run experiments/gpu_check.sh on a GPU machine)",
)
TF32_ATOL = 4e-3
BF16_ATOL = 1e-2


def _on_gpu_reference(q, k, v, *layout, window=None):
    """The reference in IEEE fp32 of the (possibly bf16) inputs."""
    with jax.default_matmul_precision("highest"):
        q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
        return jax.device_get(reference.attend(q, k, v, *layout, window=window))


@requires_gpu
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("blocks", [(16, 16), (64, 32)])
def test_flash_attention_compiled_matches_reference_on_gpu(name, blocks):
    q, k, v, layout = case_inputs(name)
    with jax.default_matmul_precision("highest"):
        got = flash_attention(
            q, k, v, *layout, block_q=blocks[0], block_k=blocks[1], interpret=False
        )
    _check(*got, *_on_gpu_reference(q, k, v, *layout), atol=1e-5)


@requires_gpu
@pytest.mark.parametrize("tq, group, n_splits", [(1, 3, 4), (2, 4, 3), (4, 1, 16)])
def test_decode_attention_compiled_matches_reference_on_gpu(tq, group, n_splits):
    rng = np.random.default_rng(tq * 10 + group)
    tk, hkv, d = 300, 2, 64
    q, k, v = _random_qkv(rng, tq, tk, group * hkv, hkv, d)
    layout = _decode_layout(tq, tk, filled=200)
    with jax.default_matmul_precision("highest"):
        got = decode_attention(q, k, v, *layout, n_splits=n_splits, block_k=32, interpret=False)
    _check(*got, *_on_gpu_reference(q, k, v, *layout), atol=1e-5)


@requires_gpu
@pytest.mark.parametrize("name", sorted(GRAD_CASES))
@pytest.mark.parametrize("blocks", [(16, 16), (64, 32)], ids=str)
def test_flash_attention_grads_compiled_match_attend_grads_on_gpu(name, blocks):
    """The backward kernels compiled by Triton, IEEE fp32 dots, against ``attend_grads``."""
    q, k, v, layout, window, *result = _grad_inputs(name)
    with jax.default_matmul_precision("highest"):
        got = flash_attention_grads(
            q,
            k,
            v,
            *layout,
            *result,
            window=window,
            block_q=blocks[0],
            block_k=blocks[1],
            interpret=False,
        )
        want = blockwise.attend_grads(q, k, v, *layout, *result, window=window)
    assert_grads_close([np.asarray(g) for g in got], [np.asarray(w) for w in jax.device_get(want)])


def _decode_layout(tq, tk, filled):
    """``[q_pos, kv_pos, q_seg, kv_seg]``: a cache with ``filled`` slots of sequence 0 (its
    first 9 belong to another sequence), empty slots after them, and ``tq`` new queries."""
    kv_pos = np.arange(tk, dtype=np.int32)
    kv_seg = np.zeros(tk, np.int32)
    kv_seg[filled:] = -1
    kv_seg[:9] = 4
    return [np.arange(filled - tq, filled, dtype=np.int32), kv_pos, np.zeros(tq, np.int32), kv_seg]


def _gpu_inputs(seed, tq, tk, hq, hkv, d, dtype):
    q, k, v = _random_qkv(np.random.default_rng(seed), tq, tk, hq, hkv, d)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _check_at_dtype(got, want, dtype):
    out, lse = got
    assert out.dtype == dtype
    _check(out, lse, *want, atol=BF16_ATOL if dtype == jnp.bfloat16 else TF32_ATOL)


GPU_DTYPES = pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32_tf32"]
)
GPU_HEADS = pytest.mark.parametrize(
    "hq, hkv, d", [(32, 8, 128), (9, 3, 64)], ids=["32q8kv_d128", "9q3kv_d64_smollm2"]
)


@requires_gpu
@GPU_DTYPES
@GPU_HEADS
@pytest.mark.parametrize(
    "t, block_q, block_k, window",
    [(1000, 128, 64, None), (1000, 64, 64, None), (1000, 64, 64, 256), (4097, 128, 64, None)],
)
def test_flash_attention_compiled_at_model_shapes_on_gpu(
    dtype, hq, hkv, d, t, block_q, block_k, window
):
    """Causal prefill at the shapes and blocks the GPU runs, default (TF32) precision."""
    q, k, v = _gpu_inputs(t, t, t, hq, hkv, d, dtype)
    pos, seg = np.arange(t, dtype=np.int32), np.zeros(t, np.int32)
    with jax.default_matmul_precision("default"):
        got = flash_attention(
            q,
            k,
            v,
            pos,
            pos,
            seg,
            seg,
            block_q=block_q,
            block_k=block_k,
            window=window,
            interpret=False,
        )
    _check_at_dtype(got, _on_gpu_reference(q, k, v, pos, pos, seg, seg, window=window), dtype)


@requires_gpu
@GPU_DTYPES
@GPU_HEADS
@pytest.mark.parametrize("tq", [1, 4])
def test_decode_attention_compiled_at_model_shapes_on_gpu(dtype, hq, hkv, d, tq):
    """A few new tokens against a 5000-slot cache (4000 filled), 16 splits of 128-row tiles."""
    q, k, v = _gpu_inputs(tq, tq, 5000, hq, hkv, d, dtype)
    layout = _decode_layout(tq, 5000, filled=4000)
    with jax.default_matmul_precision("default"):
        got = decode_attention(q, k, v, *layout, n_splits=16, block_k=128, interpret=False)
    _check_at_dtype(got, _on_gpu_reference(q, k, v, *layout), dtype)
