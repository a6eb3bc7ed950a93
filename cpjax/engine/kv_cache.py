"""A fixed-capacity KV cache pytree: keys, values and the positions/segments that mask them.

The cache has a static capacity ``C`` so one compiled decode step serves every token. Slots
``[0, fill)`` hold tokens; empty slots carry ``PAD_SEGMENT`` and are invisible to every query, so
attention may always run over the whole capacity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cpjax.attention.masks import PAD_SEGMENT
from cpjax.config import ModelConfig
from cpjax.model.decoder import PastKV


class KVCache(NamedTuple):
    """k, v: ``[L, C, Hkv, Dh]``; pos, seg: ``[C]`` int32; fill: int32 slots used.

    ``fill`` is ``[ranks]`` (one count per cache shard; ``[1]`` on one device) as the engine
    holds it, and a scalar inside a step body, which sees one shard.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    seg: jax.Array
    fill: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def as_past(self) -> PastKV:
        """The cache as the model's ``past`` argument."""
        return PastKV(self.k, self.v, self.pos, self.seg)


def init_cache(config: ModelConfig, capacity: int, dtype=jnp.float32, ranks: int = 1) -> KVCache:
    """An empty cache of ``capacity`` slots in all, cut into ``ranks`` equal shards (each
    rank's shard is a contiguous block of slots; ``fill`` is ``[ranks]``)."""
    shape = (config.n_layers, capacity, config.n_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.zeros((capacity,), jnp.int32),
        seg=jnp.full((capacity,), PAD_SEGMENT, jnp.int32),
        fill=jnp.zeros((ranks,), jnp.int32),
    )


def append(cache: KVCache, k, v, pos, seg, n_real) -> KVCache:
    """Write ``T`` new entries at slot ``fill`` and advance ``fill`` by ``n_real``.

    Args:
      k, v: ``[L, T, Hkv, Dh]`` new keys/values; pos, seg: ``[T]`` int32.
      n_real: how many of the ``T`` rows are real tokens (the rest is bucket padding, which is
        written with its negative segment and overwritten by the next append).

    The caller guarantees ``fill + T <= capacity`` (checked on the host by the engine).
    """
    start = cache.fill
    return KVCache(
        k=jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, axis=1),
        v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, axis=1),
        pos=jax.lax.dynamic_update_slice_in_dim(cache.pos, pos.astype(jnp.int32), start, axis=0),
        seg=jax.lax.dynamic_update_slice_in_dim(cache.seg, seg.astype(jnp.int32), start, axis=0),
        fill=start + jnp.asarray(n_real, jnp.int32),
    )
