"""Persistent KV cache: partial prefill (multi-turn), context-parallel decode, sampling."""

import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.engine import ContextParallel, Engine
from cpjax.engine.sampling import Sampling
from cpjax.engine.session import Session
from cpjax.errors import CpjaxError
from cpjax.parallel.mesh import make_mesh

CFG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def engines(tiny_params):
    cache = {}

    def get(context, strategy="pass_kv", decode="allreduce"):
        key = (context, strategy, decode)
        if key not in cache:
            cache[key] = Engine(
                CFG,
                tiny_params,
                ContextParallel(mesh=make_mesh(context), strategy=strategy, decode_strategy=decode),
            )
        return cache[key]

    return get


def _close(got, want, tol=1e-5):
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= tol * scale


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).astype(np.int32)


# ----------------------------------------------------------------------------- partial prefill
@pytest.mark.parametrize("strategy", ["pass_kv", "pass_q"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_split_score_equals_one_shot_score(engines, single, n, strategy):
    engine = engines(n, strategy)
    ids = _ids(83, seed=n)
    want = single.score(ids)
    for split_at in (8 * n, 8 * n + 3, [21, 50]):  # a multiple of 2N, not, three turns
        _close(engine.score(ids, split_at=split_at), want)
    _close(single.score(ids, split_at=[21, 50]), want)


@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_greedy_generation_identical_for_every_mesh_and_decode_strategy(engines, single, n, decode):
    prompt = _ids(37, seed=1)
    assert engines(n, "pass_q", decode).generate(prompt, 12) == single.generate(prompt, 12)


@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
def test_three_turn_session_matches_single_device_and_logits(engines, single, decode):
    """Partial prefill each turn, decode in between; tokens identical and decode logits exact."""
    turns = [_ids(29, 2), _ids(7, 3), _ids(18, 4)]
    runs = []
    for engine in (single, engines(4, "auto", decode)):
        session = Session(engine, capacity=256)
        runs.append([list(session.turn(t, 6)) for t in turns])
        assert session.position == sum(map(len, turns)) + 18
    assert runs[0] == runs[1]
    # The whole conversation, re-scored in one shot, predicts the same greedy tokens.
    history = np.concatenate([np.concatenate([t, r]) for t, r in zip(turns, runs[0])])
    logits = single.logits(history)
    offset = 0
    for t, r in zip(turns, runs[0]):
        offset += len(t)
        np.testing.assert_array_equal(logits[offset - 1 : offset + len(r) - 1].argmax(-1), r)
        offset += len(r)


@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_decode_logits_equal_full_forward(engines, single, n, decode):
    engine = engines(n, "pass_kv", decode)
    ids = _ids(40, 5)
    want = single.logits(ids)
    cache = engine.new_cache(128)
    logits, cache = engine.prefill(ids[:25], cache)
    _close(logits, want[24])
    for step, t in enumerate(range(25, 40)):
        logits, _, cache = engine.decode([ids[t]], [t], [0], step, cache)
        _close(logits[0], want[t])


# ----------------------------------------------------------------------------- batched decode
@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_batched_generation_equals_one_by_one(engines, single, n, decode):
    prompts = [_ids(11, 6), _ids(30, 7), _ids(5, 8)]  # B=3: above N=2, below N=8
    want = [single.generate(p, 9) for p in prompts]
    assert single.generate_batch(prompts, 9) == want
    assert engines(n, "pass_kv", decode).generate_batch(prompts, 9) == want


# ----------------------------------------------------------------------------- compile, balance
@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
def test_decode_step_compiles_once_and_cache_stays_balanced(engines, decode):
    engine = engines(4, "pass_kv", decode)
    session = Session(engine, capacity=256)
    list(session.turn(_ids(64, 9), 3))  # 2N chunks of 8: a balanced prefill
    compiled = engine._program("decode")._cache_size()
    fills = []
    for steps in range(1, 14):
        list(session.turn(_ids(1, steps), 2))  # each turn: one prefill, one decode step
        fills.append(engine.rank_fill(session.cache))
    assert engine._program("decode")._cache_size() == compiled
    prefilled = engine.rank_fill(Session(engine, 256).cache)
    assert prefilled == [0, 0, 0, 0]
    for fill in fills:
        assert max(fill) - min(fill) <= 1
    # Pure decode: after a balanced prefill (64 = 2N chunks of 8 tokens, no padding), every
    # number D of decode steps leaves the ranks within 1 of each other.
    session = Session(engine, capacity=256)
    for d, _ in enumerate(session.turn(_ids(64, 10), 30)):
        if d:
            fill = engine.rank_fill(session.cache)
            assert max(fill) - min(fill) <= 1, (d, fill)


def test_decode_owners_are_the_papers_round_robin_when_fills_are_equal():
    import jax.numpy as jnp

    from cpjax.parallel.decode import decode_owners

    for n, batch, step in [(4, 1, 0), (4, 1, 5), (4, 3, 2), (2, 5, 1), (8, 11, 3)]:
        owners = np.asarray(decode_owners(jnp.full((n,), 7, jnp.int32), step, batch))
        np.testing.assert_array_equal(owners, (np.arange(batch) + step) % n)
    # Uneven fills: the emptiest ranks first, never more than ceil(B / N) tokens per rank.
    owners = np.asarray(decode_owners(jnp.array([9, 3, 5, 3]), 1, 6))
    assert owners[:4].tolist() == [1, 3, 2, 0]
    assert np.bincount(owners, minlength=4).max() <= 2


# ----------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_mesh_independent(engines, single):
    prompt = _ids(20, 11)
    sampling = Sampling(temperature=0.8, top_k=50, top_p=0.95, seed=3)
    first = single.generate(prompt, 16, sampling=sampling)
    assert single.generate(prompt, 16, sampling=sampling) == first
    assert engines(4, "pass_kv", "ring_pass_q").generate(prompt, 16, sampling=sampling) == first
    assert engines(2).generate(prompt, 16, sampling=sampling) == first
    other = single.generate(prompt, 16, sampling=Sampling(temperature=0.8, seed=4))
    assert other != first


def test_top_k_one_and_tiny_top_p_are_greedy(single):
    prompt = _ids(20, 12)
    greedy = single.generate(prompt, 10)
    assert single.generate(prompt, 10, sampling=Sampling(temperature=1.5, top_k=1)) == greedy
    assert single.generate(prompt, 10, sampling=Sampling(temperature=1.5, top_p=1e-6)) == greedy


def test_sampling_never_leaves_the_top_k():
    import jax
    import jax.numpy as jnp

    from cpjax.engine.sampling import sample_one

    logits = jnp.asarray(np.random.default_rng(0).standard_normal(100), jnp.float32)
    top3 = set(np.argsort(-np.asarray(logits))[:3].tolist())
    draws = jax.vmap(lambda k: sample_one(logits, k, 2.0, 3, 1.0))(
        jax.random.split(jax.random.PRNGKey(0), 400)
    )
    assert set(np.asarray(draws).tolist()) == top3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature=-1.0: must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_k=-2), "top_k=-2: must be an integer >= 0"),
        (dict(top_p=0.0), "top_p=0.0: must be in \\(0, 1\\]"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(seed=-1), "seed=-1"),
    ],
)
def test_bad_sampling_parameters_are_clear_errors(kwargs, match):
    with pytest.raises(CpjaxError, match=match):
        Sampling(**kwargs)


# ----------------------------------------------------------------------------- bad input
def test_cache_overflow_names_capacity(engines):
    engine = engines(4)
    cache = engine.new_cache(64)  # 64 slots per rank
    with pytest.raises(CpjaxError, match="KV cache overflow.*of its 64 slots.*larger capacity"):
        engine.prefill(_ids(300), cache)
    session = Session(engine, capacity=40)
    with pytest.raises(CpjaxError, match="KV cache overflow"):
        list(session.turn(_ids(200), 80))


@pytest.mark.parametrize("engine_kind", ["single", "cp"])
def test_turn_that_does_not_continue_its_segment_is_an_error(engines, single, engine_kind):
    engine = single if engine_kind == "single" else engines(2)
    logits, cache = engine.prefill(_ids(10), engine.new_cache(128))
    with pytest.raises(
        CpjaxError, match="turn of segment 0 starts at position 4.*must start at 10"
    ):
        engine.prefill(_ids(5), cache, start_position=4)
    with pytest.raises(
        CpjaxError, match="turn of segment 3 starts at position 10.*must start at 0"
    ):
        engine.prefill(_ids(5), cache, start_position=10, segment=3)


@pytest.mark.parametrize("split_at", [0, 82, [30, 20], [5, 5]])
def test_bad_split_points_are_clear_errors(single, split_at):
    with pytest.raises(CpjaxError, match="split points must increase strictly"):
        single.score(_ids(83), split_at=split_at)


def test_bad_engine_and_batch_arguments_are_clear_errors(engines, single, tiny_params):
    from cpjax.parallel.mesh import make_mesh as mesh_of

    with pytest.raises(CpjaxError, match="unknown decode strategy 'ring'"):
        Engine(CFG, tiny_params, ContextParallel(mesh=mesh_of(2), decode_strategy="ring"))
    cache = single.new_cache(256)
    with pytest.raises(CpjaxError, match="sequences: expected a non-empty list"):
        single.prefill_batch([], cache)
    with pytest.raises(CpjaxError, match="segments=\\[1, 1\\]: need one distinct id >= 0"):
        single.prefill_batch([_ids(3), _ids(4)], cache, segments=[1, 1])
    with pytest.raises(CpjaxError, match="targets: shape \\(4,\\) must equal the ids' \\(5,\\)"):
        engines(2).prefill_logprobs(_ids(5), _ids(4), engines(2).new_cache(64))
