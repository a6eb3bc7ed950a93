"""Engine: KV cache prefill/decode equal the full forward; scoring; input validation."""

import jax
import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.engine import Engine, SingleDevice
from cpjax.errors import CpjaxError

CFG = PRESETS["tiny"]


@pytest.fixture(scope="module", params=["reference", "blockwise"])
def engine(request, tiny_params):
    return Engine(CFG, tiny_params, attention=request.param, bucket=16)


def test_greedy_generation_equals_argmax_of_full_forward(engine):
    prompt = np.array([5, 17, 99, 3, 200, 1, 7], np.int32)
    new = engine.generate(prompt, 20)
    assert len(new) == 20
    full = np.concatenate([prompt, new])
    logits = engine.logits(full)
    np.testing.assert_array_equal(logits[len(prompt) - 1 : -1].argmax(-1), new)


def test_prefill_then_decode_logits_equal_full_forward(engine):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, 40).astype(np.int32)
    want = engine.logits(ids)
    cache = engine.new_cache(128)
    logits, cache = engine.prefill(ids[:25], cache)
    np.testing.assert_allclose(logits, want[24], atol=1e-5)
    logits, cache = engine.prefill(ids[25:31], cache, start_position=25)  # a second turn
    np.testing.assert_allclose(logits, want[30], atol=1e-5)
    for step, t in enumerate(range(31, 40)):
        logits, _, cache = engine.decode([ids[t]], [t], [0], step, cache)
        np.testing.assert_allclose(logits[0], want[t], atol=1e-5)
    assert engine.rank_fill(cache) == [40]


def test_score_equals_log_softmax_of_logits(engine):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CFG.vocab_size, 300).astype(np.int32)
    lp = engine.score(ids)
    logits = engine.logits(ids)
    want = jax.nn.log_softmax(logits, -1)[np.arange(299), ids[1:]]
    assert lp.shape == (299,) and lp.dtype == np.float32
    np.testing.assert_allclose(lp, want, atol=1e-5)


def test_decode_step_compiles_once(engine):
    prompt = np.array([1, 2, 3], np.int32)
    engine.generate(prompt, 4)
    before = engine._program("decode")._cache_size()
    engine.generate(prompt, 30)
    engine.generate(np.array([9, 8, 7, 6, 5], np.int32), 30)
    assert engine._program("decode")._cache_size() == before


def test_generation_stops_at_a_stop_id(engine):
    prompt = np.array([5, 17, 99], np.int32)
    free = engine.generate(prompt, 10)
    stop_at = free[3]
    stopped = engine.generate(prompt, 10, stop_ids=[stop_at])
    assert stopped == free[: free.index(stop_at) + 1]


@pytest.mark.parametrize(
    "ids, match",
    [
        ([], "empty"),
        ([1, -3, 2], "token id -3 at index 1 is outside \\[0, 256\\)"),
        ([1, 256], "token id 256 at index 1 is outside"),
        ([1.5, 2.0], "must be integers, got dtype float64"),
        ([[1, 2]], "expected a 1-D sequence"),
    ],
)
def test_bad_token_ids_are_clear_errors(engine, ids, match):
    with pytest.raises(CpjaxError, match=match):
        engine.score(np.asarray(ids))


def test_too_long_prompt_and_bad_max_new_tokens(engine):
    with pytest.raises(CpjaxError, match="context window of 16384 tokens"):
        engine.generate(np.zeros(16380, np.int32), 10)
    with pytest.raises(CpjaxError, match="max_new_tokens=-1: must be an integer >= 0"):
        engine.generate(np.array([1, 2]), -1)


def test_cache_overflow_is_a_clear_error(engine):
    cache = engine.new_cache(32)
    with pytest.raises(CpjaxError, match="KV cache overflow.*capacity of 32"):
        engine.prefill(np.arange(40, dtype=np.int32), cache)


def test_long_prompt_prefilled_in_chunks_gives_the_same_tokens(engine):
    prompt = np.random.default_rng(5).integers(0, CFG.vocab_size, 70).astype(np.int32)
    whole = engine.generate(prompt, 8)
    chunked = Engine(CFG, engine.params, SingleDevice(prefill_chunk=16))  # 5 chunks, 1 short
    assert chunked.generate(prompt, 8) == whole


def _decode_hlo(engine: Engine, capacity: int) -> tuple[str, int]:
    """The optimised HLO of ``engine``'s compiled decode step over a cache of ``capacity``,
    and the cache slots per rank."""
    from cpjax.engine.sampling import GREEDY

    cache = engine.new_cache(capacity)
    args = engine.placement.put(
        "replicated", *(np.zeros(1, np.int32),) * 3, np.int32(0), *GREEDY.as_arrays()
    )
    program = engine._program("decode")
    hlo = program.lower(engine.params, *args[:4], cache, *args[4:]).compile().as_text()
    return hlo, cache.capacity // len(engine.rank_fill(cache))


@pytest.mark.parametrize("context, decode", [(1, None), (4, "allreduce"), (4, "ring_pass_q")])
def test_decode_step_never_copies_a_layer_out_of_the_cache(tiny_params, context, decode):
    """Each layer reads its cache shard in place (``LayerView``): no buffer of one layer's
    ``[C, Hkv, Dh]`` exists in the compiled step, only the stacked ``[L, C, Hkv, Dh]``, so a
    step costs no O(cache) copies (which made decode time grow with the context even where a
    sliding window hides all but the last blocks)."""
    from cpjax.engine import ContextParallel
    from cpjax.parallel.mesh import make_mesh

    placement = (
        SingleDevice()
        if context == 1
        else ContextParallel(mesh=make_mesh(context), decode_strategy=decode)
    )
    engine = Engine(CFG, tiny_params, placement, attention="blockwise")
    hlo, shard = _decode_hlo(engine, 1536 * context)  # 3 key blocks of 512 per rank
    assert shard >= 1536
    layer_shapes = [f"[{shard},{CFG.n_kv_heads},{CFG.head_dim}]", f"[1,{shard},{CFG.n_kv_heads}"]
    stack = f"f32[{CFG.n_layers},{shard},{CFG.n_kv_heads},{CFG.head_dim}]"
    assert stack in hlo
    for shape in layer_shapes:
        assert shape not in hlo, f"a layer-sized buffer {shape} in the decode step"


def test_fills_after_decode_add_one_to_the_emptiest_ranks_per_round():
    from cpjax.parallel.decode import fills_after_decode

    assert fills_after_decode([3, 1, 1, 2], 6) == [3, 3, 3, 4]  # 4 to all, then 2 to the emptiest
    assert fills_after_decode([5], 3) == [8]
    assert fills_after_decode([0, 0, 7], 2) == [1, 1, 7]


@pytest.mark.parametrize("context, decode", [(1, None), (4, "allreduce"), (4, "ring_pass_q")])
def test_decode_knows_the_fills_without_fetching_them(tiny_params, context, decode):
    """After uneven prompts, a batch of 3 decodes for several steps: the fills the engine
    checks room with (known on the host after its first step) equal the cache's, and no step
    after the first fetches them from the devices."""
    from cpjax.engine import ContextParallel
    from cpjax.parallel.mesh import make_mesh

    placement = (
        SingleDevice()
        if context == 1
        else ContextParallel(mesh=make_mesh(context), decode_strategy=decode)
    )
    engine = Engine(CFG, tiny_params, placement, attention="blockwise", bucket=8)
    prompts = [np.arange(3, 3 + n, dtype=np.int32) for n in (13, 5, 22)]
    _, cache = engine.prefill_batch(prompts, engine.new_cache(256), segments=[0, 1, 2])
    fetched, rank_fill = [], engine.rank_fill
    engine.rank_fill = lambda c: fetched.append(1) or rank_fill(c)
    tokens = np.array([7, 8, 9], np.int32)
    positions = np.array([n.size for n in prompts], np.int32)
    for step in range(6):
        _, tokens, cache = engine.decode(tokens, positions + step, [0, 1, 2], step, cache)
        assert engine._fills_before_decode(cache) == sorted(rank_fill(cache))
    assert len(fetched) == 1
