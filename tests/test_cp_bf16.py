"""The context-parallel engine in bfloat16 (the GPU default) against the fp32 single-device
engine, and batched ring decode with more sequences than ranks, compared by logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.engine import ContextParallel, Engine
from cpjax.parallel.mesh import make_mesh
from tests.test_parallel import _close

CFG = PRESETS["tiny"]
# bf16 keeps 8 significant bits, so one rounding moves a value by up to 2**-9 of its size and
# the logits, rounded at the output of a bf16 head after a few bf16 roundings on the way, carry
# errors of a few 2**-9 of the logit scale (the bf16 single-device engine: ~1.5 * 2**-8 on the
# tiny model, asserted below). A budget of 4 * 2**-8 of the scale is ~2.7x that: it admits
# rounding, not a wrong merge or a lost block (a shifted input is ~400 * 2**-8 off).
BF16_TOL = 4 * 2.0**-8
PROMPT, DECODE_FROM = 40, 25


def _ids(n, seed):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).astype(np.int32)


def _error(got, want) -> float:
    """``max |got - want|`` over the scale ``max |want|`` of ``[..., V]`` logits (or logprobs)."""
    want = np.asarray(want, np.float32)
    return float(np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def bf16_engines(tiny_params):
    cache = {}

    def get(context, decode):
        if (context, decode) not in cache:
            strategy = "pass_kv" if decode == "allreduce" else "pass_q"
            cache[context, decode] = Engine(
                CFG,
                tiny_params,
                ContextParallel(mesh=make_mesh(context), strategy=strategy, decode_strategy=decode),
                dtype=jnp.bfloat16,
            )
        return cache[context, decode]

    return get


@pytest.fixture(scope="module")
def single_bf16(tiny_params):
    return Engine(CFG, tiny_params, dtype=jnp.bfloat16)


def _decode_logits(engine, ids) -> np.ndarray:
    """``[len(ids) - DECODE_FROM + 1, V]``: the prefill logits of ``ids[:DECODE_FROM]``, then
    those of each decode step fed the next token of ``ids`` (teacher forcing)."""
    cache = engine.new_cache(128)
    logits, cache = engine.prefill(ids[:DECODE_FROM], cache)
    rows = [np.asarray(logits, np.float32)]
    for step, t in enumerate(range(DECODE_FROM, len(ids) - 1)):
        logits, _, cache = engine.decode([ids[t]], [t], [0], step, cache)
        rows.append(np.asarray(logits[0], np.float32))
    return np.stack(rows)


def test_the_bf16_tolerance_holds_the_single_device_engine_and_is_not_vacuous(single, single_bf16):
    ids = _ids(PROMPT, 1)
    want = single.logits(ids)
    assert _error(single_bf16.logits(ids), want) < BF16_TOL
    shifted = single.logits(np.roll(ids, 1))  # each token sees another prefix
    assert _error(shifted, want) > 10 * BF16_TOL


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
@pytest.mark.parametrize("n", [4, 8])
def test_bf16_context_parallel_prefill_score_and_decode_match_fp32(
    bf16_engines, single, single_bf16, n, decode
):
    """Prefill logits, partial prefill (score with split_at) and decode logits of the bf16
    ring (pass-KV with the all-reduce decode, pass-Q with the ring decode) stay within
    ``BF16_TOL`` of the fp32 single-device engine, as the bf16 single-device engine does."""
    engine = bf16_engines(n, decode)
    ids = _ids(PROMPT, n)
    want = single.logits(ids)
    assert _error(engine.logits(ids), want) <= BF16_TOL
    want_lp = single.score(ids)
    for split_at in ([21], [13, 30]):
        assert _error(engine.score(ids, split_at=split_at), want_lp) <= BF16_TOL
    want_decode = want[DECODE_FROM - 1 : PROMPT - 1]
    assert _error(_decode_logits(engine, ids), want_decode) <= BF16_TOL
    assert _error(_decode_logits(single_bf16, ids), want_decode) <= BF16_TOL


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
@pytest.mark.parametrize("n, batch", [(4, 5), (8, 10)])
def test_batched_decode_with_more_sequences_than_ranks_matches_logits(
    tiny_params, single, n, batch, decode
):
    """B > N sequences (so some rank stores several new tokens per step) decoded together:
    the logits of every sequence at every step are the single-device engine's (fp32, 1e-5),
    both engines fed the same (the single engine's greedy) tokens."""
    engine = Engine(CFG, tiny_params, ContextParallel(mesh=make_mesh(n), decode_strategy=decode))
    prompts = [_ids(5 + 7 * b, 100 + b) for b in range(batch)]
    segments = np.arange(batch, dtype=np.int32)
    caches, logits = {}, {}
    for name, e in (("single", single), ("cp", engine)):
        capacity = e.capacity_for(sum(map(len, prompts)), 6 * batch, batch)
        logits[name], caches[name] = e.prefill_batch(prompts, e.new_cache(capacity))
    _close(logits["cp"], logits["single"])
    tokens = np.asarray(logits["single"]).argmax(-1).astype(np.int32)
    positions = np.array([len(p) for p in prompts], np.int32)
    for step in range(6):
        for name, e in (("single", single), ("cp", engine)):
            logits[name], _, caches[name] = e.decode(
                tokens, positions, segments, step, caches[name]
            )
        _close(logits["cp"], logits["single"])
        tokens = np.asarray(logits["single"]).argmax(-1).astype(np.int32)
        positions = positions + 1
