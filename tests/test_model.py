"""The functional Llama on the random tiny model: shapes, dtypes, causality, packing, RoPE."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpjax.attention import blockwise, reference, with_past
from cpjax.config import PRESETS, RopeScaling
from cpjax.errors import CpjaxError
from cpjax.model.decoder import (
    Decoder,
    apply_rope,
    check_layout,
    init_params,
    param_count,
    param_shapes,
    rope_inv_freq,
)
from cpjax.parallel import sharding
from cpjax.parallel.mesh import make_mesh

CFG = PRESETS["tiny"]


def _forward_logits(
    params, tokens, positions, segments, attend=reference.attend, dtype=jnp.float32
):
    model = Decoder(CFG, with_past(attend), dtype)
    variables = {"params": jax.tree.map(lambda x: x.astype(dtype), params)}
    out = model.apply(variables, tokens, positions, segments)
    return model.apply(variables, out.hidden, method=Decoder.logits), out


def test_param_shapes_follow_the_documented_layout(tiny_params):
    shapes = jax.tree.map(lambda x: x.shape, tiny_params)
    l, d, hq, hkv, dh, f, v = (
        CFG.n_layers,
        CFG.dim,
        CFG.n_heads,
        CFG.n_kv_heads,
        CFG.head_dim,
        CFG.ffn_dim,
        CFG.vocab_size,
    )
    assert shapes == {
        "embed": (v, d),
        "final_norm": (d,),
        "lm_head": (d, v),
        "layers": {
            "attn_norm": (l, d),
            "wq": (l, d, hq, dh),
            "wk": (l, d, hkv, dh),
            "wv": (l, d, hkv, dh),
            "wo": (l, hq, dh, d),
            "mlp_norm": (l, d),
            "w_gate": (l, d, f),
            "w_up": (l, d, f),
            "w_down": (l, f, d),
        },
    }
    smol = param_shapes(PRESETS["smollm2-135m"])
    assert "lm_head" not in smol  # tied embeddings
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(smol))
    assert n == param_count(PRESETS["smollm2-135m"])
    assert abs(n - 134.5e6) < 0.5e6


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_is_the_size_of_init_params_and_of_the_model(name):
    """The table's count = the leaves of ``init_params`` = the parameters the Flax model declares
    (abstractly: no allocation for the big presets)."""
    config = PRESETS[name]
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    from_init = jax.eval_shape(lambda: init_params(config, 0))
    tokens = jnp.zeros((1,), jnp.int32)
    declared = jax.eval_shape(
        Decoder(config, with_past(reference.attend)).init, jax.random.key(0), tokens, tokens, tokens
    )["params"]
    assert jax.tree.map(lambda x: x.shape, declared) == jax.tree.map(
        lambda x: x.shape, param_shapes(config)
    )
    assert param_count(config) == size(from_init) == size(declared)


def test_param_count_matches_the_published_counts():
    assert param_count(PRESETS["llama3-8b"]) == 8_030_261_248
    assert param_count(PRESETS["smollm2-135m"]) == 134_515_008


def test_inside_a_mesh_the_model_declares_the_local_shards():
    """With ``mesh_axis_sizes``, parameters are the shards that RULES imply (heads and FFN
    split over ``tensor``; ``context`` splits no parameter)."""
    mesh = make_mesh(4, 2)
    model = Decoder(CFG, with_past(reference.attend), mesh_axis_sizes=tuple(mesh.shape.items()))
    tokens = jnp.zeros((1,), jnp.int32)
    local_init = jax.shard_map(
        lambda: model.init(jax.random.key(0), tokens, tokens, tokens)["params"],
        mesh=mesh,
        in_specs=(),
        out_specs=P(),
        check_vma=False,
    )
    shapes = jax.eval_shape(local_init)  # out_specs=P(): the global shape is one shard's
    l, d, dh, f = CFG.n_layers, CFG.dim, CFG.head_dim, CFG.ffn_dim
    layers = jax.tree.map(lambda x: x.shape, shapes["layers"])
    assert layers["wq"] == (l, d, CFG.n_heads // 2, dh)
    assert layers["wk"] == layers["wv"] == (l, d, CFG.n_kv_heads // 2, dh)
    assert layers["wo"] == (l, CFG.n_heads // 2, dh, d)
    assert layers["w_up"] == layers["w_gate"] == (l, d, f // 2)
    assert layers["w_down"] == (l, f // 2, d)
    assert shapes["embed"].shape == (CFG.vocab_size, d)


def test_a_layout_the_forward_cannot_run_is_a_clear_error(monkeypatch):
    mesh = (("context", 2), ("tensor", 2))
    check_layout(mesh)
    monkeypatch.setitem(sharding.RULES, "embed", "tensor")
    with pytest.raises(
        CpjaxError,
        match="logical axis 'embed' to mesh axis 'tensor' of size 2, "
        "but the decoder keeps 'embed' whole",
    ):
        check_layout(mesh)
    check_layout((("context", 2), ("tensor", 1)))  # a size-1 axis splits nothing
    monkeypatch.setitem(sharding.RULES, "embed", None)
    monkeypatch.setitem(sharding.RULES, "kv_heads", None)
    with pytest.raises(
        CpjaxError, match="split 'q_heads' as \\('tensor', 2\\) but 'kv_heads' as None"
    ):
        check_layout(mesh)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(tiny_params, dtype):
    t = 19
    tokens = jnp.arange(t, dtype=jnp.int32) * 7 % CFG.vocab_size
    logits, out = _forward_logits(
        tiny_params, tokens, jnp.arange(t), jnp.zeros(t, jnp.int32), dtype=dtype
    )
    assert logits.shape == (t, CFG.vocab_size) and logits.dtype == jnp.float32
    assert out.hidden.shape == (t, CFG.dim) and out.hidden.dtype == dtype
    assert out.k.shape == (CFG.n_layers, t, CFG.n_kv_heads, CFG.head_dim)
    assert np.isfinite(np.asarray(logits)).all()


def test_bf16_stays_close_to_fp32(tiny_params):
    t = 33
    tokens = jnp.arange(t, dtype=jnp.int32) * 5 % CFG.vocab_size
    args = (tokens, jnp.arange(t), jnp.zeros(t, jnp.int32))
    f32, _ = _forward_logits(tiny_params, *args)
    b16, _ = _forward_logits(tiny_params, *args, dtype=jnp.bfloat16)
    assert np.abs(np.asarray(f32) - np.asarray(b16)).max() < 0.05 * np.abs(np.asarray(f32)).max()


def test_changing_token_t_changes_no_logit_before_t(tiny_params):
    t, changed = 24, 13
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, t).astype(np.int32)
    other = tokens.copy()
    other[changed] = (other[changed] + 1) % CFG.vocab_size
    pos, seg = jnp.arange(t), jnp.zeros(t, jnp.int32)
    a, _ = _forward_logits(tiny_params, tokens, pos, seg)
    b, _ = _forward_logits(tiny_params, other, pos, seg)
    np.testing.assert_array_equal(np.asarray(a)[:changed], np.asarray(b)[:changed])
    assert np.abs(np.asarray(a)[changed:] - np.asarray(b)[changed:]).max() > 1e-3


@pytest.mark.parametrize("attend", [reference.attend, blockwise.attend], ids=["ref", "block"])
def test_two_packed_segments_equal_separate_runs(tiny_params, attend):
    rng = np.random.default_rng(1)
    a = rng.integers(0, CFG.vocab_size, 11).astype(np.int32)
    b = rng.integers(0, CFG.vocab_size, 17).astype(np.int32)
    packed = np.concatenate([a, b])
    positions = np.concatenate([np.arange(11), np.arange(17)]).astype(np.int32)
    segments = np.repeat([0, 1], [11, 17]).astype(np.int32)
    both, _ = _forward_logits(tiny_params, packed, positions, segments, attend)
    alone_a, _ = _forward_logits(tiny_params, a, np.arange(11), np.zeros(11, np.int32), attend)
    alone_b, _ = _forward_logits(tiny_params, b, np.arange(17), np.zeros(17, np.int32), attend)
    np.testing.assert_allclose(np.asarray(both)[:11], alone_a, atol=1e-5)
    np.testing.assert_allclose(np.asarray(both)[11:], alone_b, atol=1e-5)


def test_token_order_in_the_row_does_not_matter(tiny_params):
    """Masks come from positions: a permuted row gives the permuted logits."""
    t = 21
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, CFG.vocab_size, t).astype(np.int32)
    pos, seg = np.arange(t, dtype=np.int32), np.zeros(t, np.int32)
    perm = rng.permutation(t)
    want, _ = _forward_logits(tiny_params, tokens, pos, seg)
    got, _ = _forward_logits(tiny_params, tokens[perm], pos[perm], seg[perm])
    np.testing.assert_allclose(got, np.asarray(want)[perm], atol=1e-5)


def test_rope_is_a_relative_rotation():
    rng = np.random.default_rng(4)
    inv_freq = rope_inv_freq(16, 10000.0, None)
    q = rng.standard_normal((1, 1, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 16)).astype(np.float32)

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([pq]), inv_freq)
        rk = apply_rope(k, jnp.array([pk]), inv_freq)
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_llama31_rope_scaling_matches_published_rule():
    """Low frequencies divided by the factor, high ones kept, a smooth ramp in between."""
    sc = RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    plain = np.asarray(rope_inv_freq(128, 500000.0, None))
    scaled = np.asarray(rope_inv_freq(128, 500000.0, sc))
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any()
    assert np.all(scaled[mid] <= plain[mid]) and np.all(scaled[mid] >= plain[mid] / 8)


def test_init_is_deterministic():
    a = init_params(CFG, seed=3)
    b = init_params(CFG, seed=3)
    jax.tree.map(np.testing.assert_array_equal, a, b)
