"""Property-based tests (hypothesis): layout permutation, merge algebra, ring exactness.

Shapes are drawn so that jitted functions see a handful of fixed shapes (compiled once and
cached in module-level dicts); examples are derandomized so CI runs the same cases every time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from cpjax.attention import masks, reference
from cpjax.attention.masks import PAD_SEGMENT
from cpjax.attention.merge import merge, merge_stacked
from cpjax.attention.plans import PastKV
from cpjax.config import PRESETS
from cpjax.dispatch import get_attention
from cpjax.engine import ContextParallel, Engine
from cpjax.parallel.layout import (
    balanced_layout,
    causal_work_per_rank,
    chunk_counts,
    ring_step_work,
)
from cpjax.parallel.mesh import CONTEXT, make_mesh
from cpjax.parallel.ring import STRATEGIES, ring_attention
from tests.test_parallel import _close

CFG = PRESETS["tiny"]
RANKS = (1, 2, 4, 8)


def _settings(n):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ============================================================================ 1. layout
@st.composite
def layouts(draw):
    """``(lengths, n, starts, segment_ids, pad_multiple, shift)`` of a packed row."""
    n = draw(st.sampled_from(RANKS))
    lengths = draw(st.lists(st.integers(1, 70), min_size=1, max_size=5))
    starts = draw(st.lists(st.integers(0, 1000), min_size=len(lengths), max_size=len(lengths)))
    segs = draw(
        st.lists(st.integers(0, 50), min_size=len(lengths), max_size=len(lengths), unique=True)
    )
    pad_multiple = draw(st.sampled_from([1, 2, 3, 4, 8]))
    shift = draw(st.integers(-10, 10))
    return lengths, n, starts, segs, pad_multiple, shift


@_settings(300)
@given(layouts())
def test_layout_is_a_permutation_of_the_real_tokens_and_round_trips(case):
    """For any packing, N, starts, bucket and rotation: every real token sits in exactly one
    slot; shard→unshard is the identity; padding slots carry segment -1 and position 0 and
    ``shard`` writes ``fill`` there; each token keeps its own segment id and global position;
    every rank has ``local_len`` slots and ``real_per_rank`` counts its real ones."""
    lengths, n, starts, segs, pad_multiple, shift = case
    layout = balanced_layout(lengths, n, starts, segs, pad_multiple).rotated(shift)
    total = sum(lengths)
    assert layout.total == total
    assert layout.source.size == n * layout.local_len
    real = layout.source >= 0
    np.testing.assert_array_equal(np.sort(layout.source[real]), np.arange(total))

    values = np.arange(total) * 7 + 3
    sharded = layout.shard(values, fill=-5)
    assert (sharded[~real] == -5).all()
    np.testing.assert_array_equal(layout.unshard(sharded), values)
    rows = np.random.default_rng(total).standard_normal((total, 3)).astype(np.float32)
    np.testing.assert_array_equal(layout.unshard(layout.shard(rows)), rows)

    assert (layout.segments[~real] == PAD_SEGMENT).all()
    assert (layout.positions[~real] == 0).all()
    seq_of_token = np.repeat(np.arange(len(lengths)), lengths)
    offset_of_token = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    src = layout.source[real]
    np.testing.assert_array_equal(layout.segments[real], np.asarray(segs)[seq_of_token[src]])
    np.testing.assert_array_equal(
        layout.positions[real], np.asarray(starts)[seq_of_token[src]] + src - offset_of_token[src]
    )
    per_rank = real.reshape(n, layout.local_len).sum(axis=1)
    np.testing.assert_array_equal(layout.real_per_rank(), per_rank)
    assert per_rank.sum() == total


@_settings(300)
@given(layouts())
def test_rank_r_holds_chunks_r_and_2n_minus_1_minus_r_of_every_sequence(case):
    """Each sequence is cut into 2N chunks of equal width (a multiple of ``pad_multiple``, the
    least that holds ``ceil(L / 2N)`` tokens); rank r's block holds chunk r then chunk 2N-1-r,
    sequences in packing order; the chunks in order 0..2N-1 read the sequence in order; the
    chunk ``c`` holds ``chunk_counts(L, N)[c]`` (``ceil(L / 2N)`` or one fewer) real tokens,
    consecutive, at its front, and padding after them.
    ``rotated(s)`` moves rank r's block to rank r+s mod N."""
    lengths, n, starts, segs, pad_multiple, shift = case
    base = balanced_layout(lengths, n, starts, segs, pad_multiple)
    rot = base.rotated(shift)
    src = base.source.reshape(n, base.local_len)
    np.testing.assert_array_equal(rot.source.reshape(n, -1), np.roll(src, shift % n, axis=0))
    np.testing.assert_array_equal(rot.real_per_rank(), np.roll(base.real_per_rank(), shift))
    for field in ("positions", "segments"):
        np.testing.assert_array_equal(
            getattr(rot, field).reshape(n, -1),
            np.roll(getattr(base, field).reshape(n, -1), shift % n, axis=0),
        )

    at = 0
    offset = 0
    for length in lengths:
        c0 = -(-length // (2 * n))
        width = -(-c0 // pad_multiple) * pad_multiple
        blocks = src[:, at : at + 2 * width]
        chunks = [blocks[r, :width] for r in range(n)] + [
            blocks[r, width:] for r in reversed(range(n))
        ]
        order = np.concatenate(chunks)
        np.testing.assert_array_equal(order[order >= 0], offset + np.arange(length))
        counts = chunk_counts(length, n)
        np.testing.assert_array_equal([(chunk >= 0).sum() for chunk in chunks], counts)
        assert set(counts) <= {c0 - 1, c0}
        for chunk, count in zip(chunks, counts):  # [real rows, consecutive][padding]
            assert (chunk[:count] >= 0).all() and (chunk[count:] < 0).all()
            np.testing.assert_array_equal(np.diff(chunk[:count]), 1)
        at += 2 * width
        offset += length
    assert at == base.local_len


@_settings(150)
@given(
    st.sampled_from(RANKS),
    st.lists(st.integers(1, 6), min_size=1, max_size=4),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 7),
)
def test_causal_work_is_exactly_equal_when_lengths_are_multiples_of_2n(
    n, blocks, pad_multiple, shift
):
    """Paper §2's promise: with every sequence a multiple of 2N long, each rank's queries see
    exactly the same number of causal (query, key) pairs at every pass-KV ring step, for any
    packing, bucket, rotation."""
    lengths = [2 * n * b for b in blocks]
    layout = balanced_layout(lengths, n, pad_multiple=pad_multiple).rotated(shift)
    work = ring_step_work(layout)
    assert (work == work[:, :1]).all()
    assert (
        work.sum() == causal_work_per_rank(layout).sum() == sum(t * (t + 1) // 2 for t in lengths)
    )


@_settings(150)
@given(
    st.sampled_from((2, 4, 8)),
    st.lists(st.integers(1, 300), min_size=1, max_size=3),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 7),
)
def test_every_ring_step_is_balanced_within_the_proven_ratio(n, lengths, pad_multiple, shift):
    """For any packing of sequences of >= 4N tokens (chunks of w >= 2 rows), bucket and
    rotation, each pass-KV step's most loaded rank sees at most (w / (w - 1))^2 times the
    pairs of its least loaded one, w = ceil(L / 2N) of the shortest sequence."""
    lengths = [4 * n + t for t in lengths]
    work = ring_step_work(balanced_layout(lengths, n, pad_multiple=pad_multiple).rotated(shift))
    width = -(-min(lengths) // (2 * n))
    assert (work.max(axis=1) <= (width / (width - 1)) ** 2 * work.min(axis=1)).all()


# ============================================================================ 2. merge
TQ, TK, HQ, HKV, D = 6, 12, 4, 2, 8


@st.composite
def attention_parts(draw):
    """Random q/k/v with masks (including blind and padding queries) and a partition of the
    keys into 1..4 disjoint parts (some possibly empty)."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))
    n_parts = draw(st.integers(1, 4))
    part_of_key = np.array(draw(st.lists(st.integers(0, n_parts - 1), min_size=TK, max_size=TK)))
    q_seg = np.array(draw(st.lists(st.integers(-1, 2), min_size=TQ, max_size=TQ)), np.int32)
    kv_seg = np.array(draw(st.lists(st.integers(-1, 1), min_size=TK, max_size=TK)), np.int32)
    q_pos = np.array(draw(st.lists(st.integers(0, 20), min_size=TQ, max_size=TQ)), np.int32)
    kv_pos = np.array(draw(st.lists(st.integers(0, 20), min_size=TK, max_size=TK)), np.int32)
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((TQ, HQ, D)) * scale).astype(np.float32)
    k = rng.standard_normal((TK, HKV, D)).astype(np.float32)
    v = rng.standard_normal((TK, HKV, D)).astype(np.float32)
    return q, k, v, q_pos, kv_pos, q_seg, kv_seg, part_of_key, n_parts


def _partials(q, k, v, q_pos, kv_pos, q_seg, kv_seg, part_of_key, n_parts):
    """Attention over each key part (keys outside the part hidden with segment -1)."""
    parts = []
    for p in range(n_parts):
        seg_p = np.where(part_of_key == p, kv_seg, -1).astype(np.int32)
        parts.append(reference.attend(q, k, v, q_pos, kv_pos, q_seg, seg_p))
    return parts


def _assert_same(got, want, tol=1e-5):
    (out, lse), (want_out, want_lse) = got, want
    out, lse = np.asarray(out), np.asarray(lse)
    want_out, want_lse = np.asarray(want_out), np.asarray(want_lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=tol, atol=tol)
    np.testing.assert_allclose(out, want_out, rtol=tol, atol=tol)


@_settings(60)
@given(attention_parts())
def test_merging_partials_over_disjoint_key_sets_equals_attention_over_the_union(case):
    """Folding ``merge`` over the parts (in any order) and ``merge_stacked`` of all parts both
    equal attention over all keys; queries that see no key (padding, empty segment, keys all in
    the future) get out exactly 0 and lse -inf, never NaN."""
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, part_of_key, n_parts = case
    want = reference.attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    parts = _partials(*case)
    out, lse = parts[0]
    for part in parts[1:]:
        out, lse = merge(out, lse, *part)
    _assert_same((out, lse), want)
    out_r, lse_r = parts[-1]
    for part in reversed(parts[:-1]):
        out_r, lse_r = merge(*part, out_r, lse_r)
    _assert_same((out_r, lse_r), want)
    stacked = merge_stacked(jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts]))
    _assert_same(stacked, want)
    blind = ~np.asarray(masks.visibility_mask(q_pos, kv_pos, q_seg, kv_seg)).any(axis=1)
    for got_out, got_lse in ((out, lse), stacked):
        assert (np.asarray(got_out)[blind] == 0).all()
        assert np.isneginf(np.asarray(got_lse)[blind]).all()


@_settings(60)
@given(attention_parts(), st.randoms(use_true_random=False))
def test_merge_is_commutative_and_associative(case, random):
    """``merge(a, b) == merge(b, a)`` bit for bit; ``merge(merge(a, b), c)`` equals
    ``merge(a, merge(b, c))`` to 1e-5; ``merge_stacked`` does not depend on the order of the
    stack. Holds with empty parts (lse -inf) in any position."""
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, part_of_key, _ = case
    a, b, c = _partials(q, k, v, q_pos, kv_pos, q_seg, kv_seg, part_of_key % 3, 3)
    ab, ba = merge(*a, *b), merge(*b, *a)
    for x, y in zip(ab, ba):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _assert_same(merge(*ab, *c), merge(*a, *merge(*b, *c)))
    order = [a, b, c]
    random.shuffle(order)
    _assert_same(
        merge_stacked(jnp.stack([p[0] for p in order]), jnp.stack([p[1] for p in order])),
        merge_stacked(jnp.stack([a[0], b[0], c[0]]), jnp.stack([a[1], b[1], c[1]])),
    )


def test_merge_with_a_fully_empty_side_is_the_other_side_exactly():
    """An lse=-inf side has weight 0: merging it leaves the other partial bit-identical
    (a case a property draw may miss)."""
    rng = np.random.default_rng(0)
    out = jnp.asarray(rng.standard_normal((TQ, HQ, D)), jnp.float32)
    lse = jnp.asarray(rng.standard_normal((TQ, HQ)), jnp.float32)
    empty_out, empty_lse = jnp.full_like(out, 7.0), jnp.full_like(lse, -jnp.inf)
    for got_out, got_lse in (
        merge(out, lse, empty_out, empty_lse),
        merge(empty_out, empty_lse, out, lse),
    ):
        np.testing.assert_array_equal(np.asarray(got_out), np.asarray(out))
        np.testing.assert_array_equal(np.asarray(got_lse), np.asarray(lse))


# ============================================================================ 3. rings
SLOTS = 64  # new-token slots over all ranks (each rank: SLOTS / N)
PAST = 8  # cache rows per rank
_RING_FNS = {}


def _ring_fn(n, strategy):
    """jit(shard_map(ring_attention)) with the reference attend, one compile per (N, ring)."""
    key = (n, strategy)
    if key not in _RING_FNS:
        plan = ring_attention(strategy, get_attention("reference"), CONTEXT, n)

        def local(q, k, v, pos, seg, pk, pv, ppos, pseg):
            return plan(q, k, v, pos, seg, PastKV(pk, pv, ppos, pseg))

        row = P(CONTEXT)
        _RING_FNS[key] = jax.jit(
            jax.shard_map(
                local, mesh=make_mesh(n), in_specs=(row,) * 9, out_specs=(row, row), check_vma=False
            )
        )
    return _RING_FNS[key]


@jax.jit
def _reference_attend_fixed(*args):
    return reference.attend(*args)


def _reference_padded(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """``reference.attend`` with queries padded to SLOTS rows and keys to SLOTS + 8 * PAST
    (padding segment -1), so that it compiles once; returns the real queries' rows."""
    tq, tk = q.shape[0], k.shape[0]

    def pad(x, rows, fill=0):
        return np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=fill)

    kv_rows = SLOTS + max(RANKS) * PAST
    out, lse = _reference_attend_fixed(
        pad(q, SLOTS),
        pad(k, kv_rows),
        pad(v, kv_rows),
        pad(q_pos, SLOTS),
        pad(kv_pos, kv_rows),
        pad(q_seg, SLOTS, PAD_SEGMENT),
        pad(kv_seg, kv_rows, PAD_SEGMENT),
    )
    assert tq <= SLOTS and tk <= kv_rows
    return np.asarray(out)[:tq], np.asarray(lse)[:tq]


@st.composite
def ring_cases(draw, n):
    """A packed row of 1..4 sequences that fits ``SLOTS`` slots in the balanced layout of N
    ranks, rotated, plus a per-rank cache shard with arbitrary positions/segments."""
    lengths = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    while sum(-(-t // (2 * n)) * 2 * n for t in lengths) > SLOTS:  # keep the prefix that fits
        lengths = lengths[:-1]  # (one sequence of <= 40 always fits)
    k = len(lengths)
    starts = draw(st.lists(st.integers(0, 30), min_size=k, max_size=k))
    segs = draw(st.lists(st.integers(0, 5), min_size=k, max_size=k, unique=True))
    shift = draw(st.integers(0, n - 1))
    past_seg = draw(st.lists(st.sampled_from([-1] + segs), min_size=n * PAST, max_size=n * PAST))
    past_pos = draw(st.lists(st.integers(0, 60), min_size=n * PAST, max_size=n * PAST))
    seed = draw(st.integers(0, 2**31 - 1))
    return (
        lengths,
        starts,
        segs,
        shift,
        np.array(past_seg, np.int32),
        np.array(past_pos, np.int32),
        seed,
    )


def _pad_ranks(values, n, width, fill):
    """Pad each of the n rank blocks of ``values`` at its end to ``width`` rows."""
    blocks = np.asarray(values).reshape(n, -1, *np.shape(values)[1:])
    pad = [(0, 0), (0, width - blocks.shape[1])] + [(0, 0)] * (blocks.ndim - 2)
    return np.pad(blocks, pad, constant_values=fill).reshape(n * width, *blocks.shape[2:])


@pytest.mark.parametrize("n", RANKS)
@given(data=st.data())
@_settings(20)
def test_every_ring_strategy_equals_reference_attention(n, data):
    """For any packed row (lengths, start positions, segment ids), N in {1, 2, 4, 8}, layout
    rotation and cache shard contents, pass_kv, pass_q and all_gather give the reference
    attention of every real query over all new keys plus every rank's cache rows (to 1e-5),
    and padding queries get out 0 and lse -inf."""
    lengths, starts, segs, shift, past_seg, past_pos, seed = data.draw(ring_cases(n))
    layout = balanced_layout(lengths, n, starts, segs).rotated(shift)
    local = SLOTS // n
    total = sum(lengths)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((total, HQ, D)).astype(np.float32)
    k, v = rng.standard_normal((2, total, HKV, D)).astype(np.float32)
    pk, pv = rng.standard_normal((2, n * PAST, HKV, D)).astype(np.float32)
    pos = np.concatenate([s + np.arange(t) for s, t in zip(starts, lengths)]).astype(np.int32)
    seg = np.repeat(segs, lengths).astype(np.int32)

    source = _pad_ranks(layout.source, n, local, -1)
    args = [_pad_ranks(layout.shard(x), n, local, 0) for x in (q, k, v)]
    args += [
        _pad_ranks(layout.positions, n, local, 0),
        _pad_ranks(layout.segments, n, local, PAD_SEGMENT),
    ]
    args += [pk, pv, past_pos, past_seg]

    want_out, want_lse = _reference_padded(
        q,
        np.concatenate([k, pk]),
        np.concatenate([v, pv]),
        pos,
        np.concatenate([pos, past_pos]),
        seg,
        np.concatenate([seg, past_seg]),
    )
    real = source >= 0
    for strategy in STRATEGIES:
        out, lse = (np.asarray(x) for x in _ring_fn(n, strategy)(*args))
        got_out = np.empty_like(want_out)
        got_lse = np.empty_like(want_lse)
        got_out[source[real]], got_lse[source[real]] = out[real], lse[real]
        _assert_same((got_out, got_lse), (want_out, want_lse))
        assert (out[~real] == 0).all() and np.isneginf(lse[~real]).all(), strategy


# ---------------------------------------------------------------------------- whole model
_ENGINES = {}
ROW = 192  # packed rows in 64-token buckets fill exactly 3 buckets: one compile


def _engine(tiny_params, n, strategy):
    if (n, strategy) not in _ENGINES:
        _ENGINES[n, strategy] = Engine(
            CFG, tiny_params, ContextParallel(mesh=make_mesh(n), strategy=strategy)
        )
    return _ENGINES[n, strategy]


@st.composite
def packed_rows(draw):
    """1..3 sequences whose 64-token buckets sum to 3, so that every engine sees ROW slots."""
    buckets = draw(st.sampled_from([(3,), (1, 2), (2, 1), (1, 1, 1)]))
    lengths = [draw(st.integers(64 * (b - 1) + 1, 64 * b)) for b in buckets]
    starts = draw(st.lists(st.integers(0, 500), min_size=len(lengths), max_size=len(lengths)))
    segs = draw(
        st.lists(st.integers(0, 9), min_size=len(lengths), max_size=len(lengths), unique=True)
    )
    seed = draw(st.integers(0, 2**31 - 1))
    return lengths, starts, segs, seed


@_settings(8)
@given(packed_rows())
def test_context_parallel_logits_equal_single_device_for_every_ring_and_n(tiny_params, single, row):
    """The tiny model's logits of a packed row (random lengths, start positions, segment ids)
    are the single-device engine's, to 1e-5, for every strategy and N in {1, 2, 4, 8}."""
    lengths, starts, segs, seed = row
    total = sum(lengths)
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, total).astype(np.int32)
    pos = np.concatenate([s + np.arange(t) for s, t in zip(starts, lengths)]).astype(np.int32)
    seg = np.repeat(segs, lengths).astype(np.int32)
    # The single engine compiles per length: fill the row up to ROW with one more sequence
    # (its own segment id, so it influences no other token) and keep the rows of the first ones.
    pad = ROW - total
    want = single.logits(
        np.pad(ids, (0, pad)),
        np.concatenate([pos, np.arange(pad)]),
        np.pad(seg, (0, pad), constant_values=10),
    )[:total]
    assert np.isfinite(want).all()
    for n in RANKS:
        for strategy in STRATEGIES[:1] if n == 1 else STRATEGIES:  # N=1 has no ring
            got = _engine(tiny_params, n, strategy).logits(ids, pos, seg)
            assert got.shape == want.shape
            _close(got, want)


@pytest.mark.parametrize("n", [2, 8])
def test_engine_layout_of_packed_rows_stays_in_one_shape_bucket(tiny_params, n):
    """Guard for the test above: packed rows of 3 buckets all get ROW slots (otherwise every
    example would recompile)."""
    engine = _engine(tiny_params, n, "pass_kv")
    for lengths in ([1, 1, 1], [64, 64, 64], [65, 1], [192], [129]):
        assert (
            engine.placement.prefill_layout(
                lengths,
                [0] * len(lengths),
                range(len(lengths)),
                [0] * n,
                engine.bucket,
                engine.forward.attention,
            ).source.size
            == ROW
        )
