"""Pallas kernels (interpret mode on CPU, compiled on GPU) against the reference attend."""

import jax.numpy as jnp
import numpy as np
import pytest

from cpjax.attention import reference
from pallas_kernels import decode_attention, flash_attention
from tests.test_attention import (CASES, _random_qkv, assert_attention_close,
                                  case_inputs)


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
    got = flash_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=20, block_q=16,
                          block_k=32, interpret=True)
    _check(*got, *want, atol=1e-5)


def test_flash_attention_bf16():
    rng = np.random.default_rng(11)
    q, k, v = _random_qkv(rng, 40, 40, 8, 2, 64)
    pos, seg = np.arange(40, dtype=np.int32), np.zeros(40, np.int32)
    want = reference.attend(q, k, v, pos, pos, seg, seg)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out, lse = flash_attention(qb, kb, vb, pos, pos, seg, seg, block_q=16, block_k=16,
                               interpret=True)
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
    kv_seg[200:] = -1                   # empty cache slots
    kv_seg[:9] = 4                      # another sequence in the cache
    q_pos = np.arange(200 - tq, 200, dtype=np.int32)
    q_seg = np.zeros(tq, np.int32)
    want = reference.attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    got = decode_attention(q, k, v, kv_pos, kv_seg, q_pos, q_seg, n_splits=n_splits,
                           block_k=32, interpret=True)
    _check(*got, *want, atol=1e-5)


def test_rings_with_pallas_match_reference_on_8_devices(tiny_params):
    from cpjax.config import PRESETS
    from cpjax.engine import Engine
    from cpjax.engine.context_parallel import ContextParallelEngine
    from cpjax.parallel.mesh import make_mesh

    cfg = PRESETS["tiny"]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 150).astype(np.int32)
    want = Engine(cfg, tiny_params, attention="reference").logits(ids)
    for strategy in ("pass_kv", "pass_q"):
        engine = ContextParallelEngine(cfg, tiny_params, mesh=make_mesh(8), strategy=strategy,
                                       attention="pallas")
        assert np.abs(engine.logits(ids) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_kernel_benchmark_script_runs_in_smoke_mode(tmp_path):
    import json

    from experiments.bench_kernels import main
    main(["--smoke", "--out", str(tmp_path / "k.json")])
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"pallas", "blockwise_xla", "pallas_decode"}
    assert all("error" not in r and r["seconds"] > 0 for r in rows)
