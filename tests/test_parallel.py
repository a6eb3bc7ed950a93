"""Context parallelism on fake CPU meshes: exact against the single-device run."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpjax.config import PRESETS
from cpjax.engine import ContextParallel, Engine
from cpjax.errors import CpjaxError
from cpjax.parallel.comm import formula_bytes_per_layer, hlo_collective_bytes
from cpjax.parallel.layout import balanced_layout, causal_work_per_rank
from cpjax.parallel.mesh import make_mesh
from cpjax.parallel import sharding
from cpjax.parallel.ring import STRATEGIES

CFG = PRESETS["tiny"]
MESHES = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)]


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("lengths", [[1], [16], [37], [5, 64, 11]])
def test_layout_round_trips_and_pads_each_sequence_to_2n(n, lengths):
    layout = balanced_layout(lengths, n)
    values = np.arange(sum(lengths)) * 10
    np.testing.assert_array_equal(layout.unshard(layout.shard(values)), values)
    padded = sum(-(-t // (2 * n)) * 2 * n for t in lengths)
    assert layout.source.size == padded == n * layout.local_len
    assert (layout.segments < 0).sum() == padded - sum(lengths)
    for seg, length in enumerate(lengths):      # positions are each sequence's own 0..T-1
        assert sorted(layout.positions[layout.segments == seg]) == list(range(length))


def test_layout_rank_r_holds_chunks_r_and_2n_minus_1_minus_r():
    layout = balanced_layout([16], 4)           # 8 chunks of 2 tokens
    per_rank = layout.source.reshape(4, 4)
    assert per_rank.tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11],
                                 [6, 7, 8, 9]]


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("lengths", [[64 * 8], [64 * 8 + 13], [300, 700, 129]])
def test_causal_work_is_balanced_within_one_percent(n, lengths):
    work = causal_work_per_rank(balanced_layout(lengths, n))
    assert np.abs(work / work.mean() - 1).max() < 0.01


# ----------------------------------------------------------------------------- exactness
@pytest.fixture(scope="module")
def engines(tiny_params):
    cache = {}

    def get(context, tensor, strategy):
        key = (context, tensor, strategy)
        if key not in cache:
            cache[key] = Engine(CFG, tiny_params, ContextParallel(mesh=make_mesh(context, tensor), strategy=strategy))
        return cache[key]
    return get


def _close(got, want, tol=1e-5):
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= tol * scale


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_logits_and_scores_equal_single_device(engines, single, mesh, strategy):
    engine = engines(*mesh, strategy)
    rng = np.random.default_rng(sum(mesh))
    for length in (2 * mesh[0] * 8, 2 * mesh[0] * 8 + 5, 203):   # multiple of 2N and not
        ids = rng.integers(0, CFG.vocab_size, length).astype(np.int32)
        _close(engine.logits(ids), single.logits(ids))
        _close(engine.score(ids), single.score(ids))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_packed_batch_of_three_unequal_sequences(engines, single, mesh, strategy):
    rng = np.random.default_rng(7)
    lengths = [13, 40, 27]
    ids = rng.integers(0, CFG.vocab_size, sum(lengths)).astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    segments = np.repeat(np.arange(3), lengths).astype(np.int32)
    got = engines(*mesh, strategy).logits(ids, positions, segments)
    _close(got, single.logits(ids, positions, segments))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", [(2, 1), (8, 1), (4, 2)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_greedy_generation_after_cp_prefill_is_identical(engines, single, mesh, strategy):
    prompt = np.random.default_rng(3).integers(0, CFG.vocab_size, 45).astype(np.int32)
    assert engines(*mesh, strategy).generate(prompt, 12) == single.generate(prompt, 12)


@pytest.mark.parametrize("changes", [{"ffn": None}, {"q_heads": None, "kv_heads": None}],
                         ids=["ffn-replicated", "heads-replicated"])
def test_editing_the_rules_alone_changes_the_layout_not_the_logits(monkeypatch, tiny_params,
                                                                   single, changes):
    """The model derives its shard shapes and psums from RULES: replicate the FFN (or the
    heads) on a context 2 x tensor 2 mesh and the logits stay those of one device."""
    for axis, mesh_axis in changes.items():
        monkeypatch.setitem(sharding.RULES, axis, mesh_axis)
    engine = Engine(CFG, tiny_params, ContextParallel(mesh=make_mesh(2, 2), strategy="pass_kv"))
    replicated = "w_up" if "ffn" in changes else "wq"
    assert all(axis is None for axis in engine.params["layers"][replicated].sharding.spec)
    ids = np.random.default_rng(5).integers(0, CFG.vocab_size, 37).astype(np.int32)
    _close(engine.logits(ids), single.logits(ids))


def test_two_axes_of_one_array_on_one_mesh_axis_is_an_error(monkeypatch):
    monkeypatch.setitem(sharding.RULES, "embed", "tensor")
    with pytest.raises(CpjaxError, match="map logical axes 'embed' and 'q_heads' of one array "
                                         ".* both to mesh axis 'tensor'"):
        sharding.spec(("layers", "embed", "q_heads", "head_dim"))
    assert sharding.spec(("embed",)) == P("tensor")


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hlo_collectives_and_bytes_match_the_formula(engines, strategy):
    engine = engines(4, 1, strategy)
    layout = engine.placement.row_layout(np.arange(128), np.zeros(128, np.int32), engine.bucket,
                                         engine.forward.attention)
    args = engine._rows(layout, np.arange(128) % CFG.vocab_size)
    hlo = engine._program("logits", strategy).lower(engine.params, *args).compile().as_text()
    sent = hlo_collective_bytes(hlo, 4)
    expected = formula_bytes_per_layer(strategy, 4, layout.local_len, layout.local_len,
                                       CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, 4)
    assert sum(sent.values()) == expected
    if strategy == "pass_kv":
        assert sent["collective-permute"] > 0 and sent["all-gather"] == sent["all-to-all"] == 0
    elif strategy == "pass_q":
        assert sent["collective-permute"] > 0 and sent["all-to-all"] > 0
        assert sent["all-gather"] == 0
    else:
        assert sent["all-gather"] > 0 and sent["collective-permute"] == 0


# ----------------------------------------------------------------------------- bad input
def test_bad_parallel_configurations_are_clear_errors(tiny_params):
    with pytest.raises(CpjaxError, match="context=3 x tensor=1 = 3 devices does not divide"):
        make_mesh(3, 1)
    with pytest.raises(CpjaxError, match="needs 16 devices, but only 8"):
        make_mesh(16, 1)
    with pytest.raises(CpjaxError, match="tensor=4 does not divide n_kv_heads=2"):
        Engine(CFG, tiny_params, ContextParallel(mesh=make_mesh(2, 4)))
    with pytest.raises(CpjaxError, match="unknown context-parallel strategy 'ring'"):
        Engine(CFG, tiny_params, ContextParallel(mesh=make_mesh(2, 1), strategy="ring"))
