"""Tiles are part of the attention contract: ring blocks tile the layout chunks.

A rank holds layout chunks ``r`` and ``2N-1-r``; the layout pads each chunk to
``chunk_rows_multiple`` rows and the ring hands ``impl.attend`` blocks that tile one chunk
(``chunk_blocks``), so that no block straddles two chunks and the causal skip works. The
visit counts below come from what each implementation skips: the shared block-bounds test
(``masks.visible_block_schedule``) on the blocks blockwise and the Triton kernel use, and the
Hopper kernel's own visit lists.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpjax.attention import blockwise, reference
from cpjax.attention.masks import PAD_SEGMENT, visible_block_schedule
from cpjax.attention.padding import pad_rows
from cpjax.dispatch import KERNEL_TILE, get_attention
from cpjax.parallel.layout import balanced_layout
from cpjax.parallel.mesh import CONTEXT
from cpjax.parallel.ring import chunk_blocks, chunk_rows_multiple, ring_attention
from pallas_kernels.flash_attention_mgpu import BLOCK_Q as MGPU_BLOCK_Q
from pallas_kernels.flash_attention_mgpu import visit_lists
from tests.test_attention import assert_attention_close

BLOCKED = ["blockwise", "pallas", "pallas_mgpu"]
BUCKET = 64


def _visits(impl, q_pos, q_seg, kv_pos, kv_seg, blocks: dict):
    """``(visited key blocks, block_q, block_k)`` of one ``impl.attend`` call with ``blocks``."""
    block_q = blocks.get("block_q", impl.block_q)
    block_k = blocks.get("block_k", impl.block_k)
    if impl.name == "pallas_mgpu":
        assert block_q == MGPU_BLOCK_Q
        return int(visit_lists(q_pos, kv_pos, q_seg, kv_seg, block_k)[1].sum()), block_q, block_k
    if impl.name == "blockwise":
        block_q, block_k = blockwise.block_sizes(q_pos.size, kv_pos.size, block_q, block_k)
    counts = visible_block_schedule(
        pad_rows(q_pos, block_q, 0),
        pad_rows(kv_pos, block_k, 0),
        pad_rows(q_seg, block_q, PAD_SEGMENT),
        pad_rows(kv_seg, block_k, PAD_SEGMENT),
        block_q,
        block_k,
    )[1]
    return int(counts.sum()), block_q, block_k


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("name", BLOCKED)
def test_chunk_aligned_pass_kv_visits_only_the_causal_blocks(name, n):
    """A pass-KV ring over a layout padded by ``chunk_rows_multiple``: over the N steps every
    rank visits exactly its chunks' causal past -- all ``(2N-1)`` earlier chunk pairs in full
    and the triangle of blocks of its two diagonal chunk pairs.

    Fails if blocks straddle the rank's two chunks (no tile padding, or blocks not cut from the
    chunk), and if every block is taken as visible. Each chunk holds 120 tokens (5 chunks one
    padding row each), padded to 128 rows: not a multiple of the tile without the rule.
    """
    impl = get_attention(name)
    length = 2 * n * 120 - 5
    layout = balanced_layout([length], n, pad_multiple=chunk_rows_multiple(impl, n, BUCKET, length))
    pos = layout.positions.reshape(n, -1)
    seg = layout.segments.reshape(n, -1)
    blocks = chunk_blocks(impl, layout.local_len)
    area = 0
    for rank in range(n):
        for step in range(n):
            source = (rank - step) % n
            visited, block_q, block_k = _visits(
                impl, pos[rank], seg[rank], pos[source], seg[source], blocks
            )
            area += visited * block_q * block_k
    chunk = 128  # 120 rows padded to the tile
    causal_area = (2 * n - 1) * chunk**2 + chunk * (chunk + block_q)
    assert area == n * causal_area
    assert layout.local_len == 2 * chunk and chunk % block_q == 0 and block_q == block_k


def test_chunk_rows_multiple_pads_chunks_to_the_tile_when_it_costs_little():
    """Bucketing alone (``bucket // 2N`` rows) for chunks under one tile or when the tile would
    add over 1/8 of the rows (75 -> 128); the tile otherwise; dense paths (tile 1) bucket."""
    pallas, reference_impl = get_attention("pallas"), get_attention("reference")
    assert chunk_rows_multiple(pallas, 4, BUCKET, 8 * 55) == 8  # under one tile
    assert chunk_rows_multiple(pallas, 4, BUCKET, 8 * 64) == 64
    assert chunk_rows_multiple(pallas, 2, 1024, 10_000) == 256
    assert chunk_rows_multiple(pallas, 8, 1, 10_000) == 64
    assert chunk_rows_multiple(pallas, 2, BUCKET, 300) == 16  # 75 rows: 80, not 128
    assert chunk_rows_multiple(pallas, 2, BUCKET, 4 * 120) == 64  # 120 rows: 128
    assert chunk_rows_multiple(reference_impl, 4, BUCKET, 10_000) == 8


def test_chunk_blocks_tile_one_chunk_or_keep_the_defaults():
    blockwise_impl, pallas = get_attention("blockwise"), get_attention("pallas")
    assert chunk_blocks(blockwise_impl, 2 * 384) == {"block_q": 128, "block_k": 128}
    assert chunk_blocks(blockwise_impl, 2 * 1024) == {"block_q": 256, "block_k": 512}
    assert chunk_blocks(pallas, 2 * 192) == {"block_q": 64, "block_k": 64}
    assert chunk_blocks(pallas, 2 * 100) == {}  # not a multiple of the tile
    assert chunk_blocks(pallas, 2 * 32) == {}  # under one tile
    assert chunk_blocks(get_attention("reference"), 2 * 128) == {}


@pytest.mark.parametrize("name", ["reference", "cudnn", *BLOCKED])
def test_each_implementation_states_its_tile(name):
    """Blocked paths: the 64-row tile divides their default blocks; dense paths: tile 1."""
    impl = get_attention(name)
    if name in BLOCKED:
        assert impl.tile == KERNEL_TILE
        assert impl.block_q % impl.tile == 0 and impl.block_k % impl.tile == 0
    else:
        assert impl.tile == 1 and impl.block_q is None and impl.block_k is None


@pytest.mark.parametrize("name", BLOCKED)
def test_ring_with_chunk_aligned_blocks_matches_reference(name):
    """pass-KV on 2 ranks with the padded layout and the chunk blocks (64-row tiles for the
    kernels, the 128-row chunk for blockwise) equals the reference attention."""
    impl, n = get_attention(name), 2
    length = 2 * n * 120 - 5
    layout = balanced_layout([length], n, pad_multiple=chunk_rows_multiple(impl, n, BUCKET, length))
    rng = np.random.default_rng(1)
    dtype = jnp.bfloat16 if name == "pallas_mgpu" else jnp.float32
    q, k, v = (jnp.asarray(rng.standard_normal((length, h, 64)), dtype) for h in (2, 1, 1))
    exact = [np.asarray(x, np.float32) for x in (q, k, v)]
    pos = layout.unshard(layout.positions)
    seg = layout.unshard(layout.segments)
    want = reference.attend(*exact, pos, pos, seg, seg)

    plan = ring_attention("pass_kv", impl, CONTEXT, n)
    per_rank = lambda x: jnp.asarray(layout.shard(x)).reshape(n, -1, *x.shape[1:])  # noqa: E731
    out, lse = jax.jit(jax.vmap(lambda *a: plan(*a, None), axis_name=CONTEXT))(
        per_rank(q),
        per_rank(k),
        per_rank(v),
        layout.positions.reshape(n, -1),
        layout.segments.reshape(n, -1),
    )
    out = layout.unshard(np.asarray(out, np.float32).reshape(-1, 2, 64))
    lse = layout.unshard(np.asarray(lse).reshape(-1, 2))
    if dtype == jnp.bfloat16:
        assert_attention_close(out, lse, *want, atol=2e-2, lse_tol=2e-5)
    else:
        assert_attention_close(out, lse, *want, atol=1e-5)
