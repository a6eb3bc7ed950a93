"""Context-parallel inference: the Llama forward under ``shard_map`` with a sharded KV cache.

* Prefill (full or partial): the new tokens are permuted into the load-balanced layout
  (``cpjax.parallel.layout``) and sharded over the ``context`` axis; every attention call is a
  ring (``cpjax.parallel.ring.ring_attention``) over each rank's cache shard plus its new rows;
  RoPE and masks use the true global positions; each rank appends its new K/V to its own cache
  shard, where they stay (persistent KV: a follow-up turn is a partial prefill).
* Decode, two exact ways (``decode_strategy``):
  ``ring_pass_q`` — the paper's: the query count is padded to a multiple of N, the real token
  sits on rank ``step mod N`` (round-robin, shifted by one each step), a pass-Q ring visits
  every cache shard and one all-to-all returns the partials;
  ``allreduce`` — every rank runs the (cheap) linear layers for the new token, attends its own
  shard, and the partials merge in one ``pmax``/``psum``; no ring, no all-to-all.
  In both, the new token's K/V is stored on rank ``step mod N`` so the caches stay balanced.
* Parameters are sharded over the ``tensor`` axis by the rules table (heads, FFN columns).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cpjax.attention import get_attend
from cpjax.engine import kv_cache
from cpjax.engine.engine import SCORE_CHUNK, Engine, round_up, validate_token_ids
from cpjax.engine.kv_cache import KVCache
from cpjax.errors import CpjaxError, require
from cpjax.model.llama import KV_AXES, PARAM_AXES, Llama
from cpjax.parallel.layout import Layout, balanced_layout
from cpjax.parallel.mesh import CONTEXT, TENSOR
from cpjax.parallel.ring import STRATEGIES, allreduce_decode_attention, ring_attention
from cpjax.parallel.sharding import spec, tree_specs

DECODE_STRATEGIES = ("allreduce", "ring_pass_q")


def check_tensor_divisibility(config, tensor: int) -> None:
    """Heads, KV heads and the FFN width must split evenly over the tensor axis."""
    for name, value in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
                        ("ffn_dim", config.ffn_dim)):
        require(value % tensor == 0,
                f"tensor={tensor} does not divide {name}={value} of model {config.name!r}; "
                f"choose a tensor size that divides the number of heads and KV heads")


def segment_runs(positions: np.ndarray, segments: np.ndarray):
    """Split a packed row into its sequences: ``(lengths, start_positions, segment_ids)``.

    Each run of equal segment ids must hold consecutive positions.
    """
    starts = np.flatnonzero(np.diff(segments, prepend=segments[0] - 1) != 0)
    ends = np.append(starts[1:], segments.size)
    lengths, first_positions, ids = [], [], []
    for a, b in zip(starts, ends):
        run = positions[a:b]
        require(np.array_equal(run, run[0] + np.arange(b - a)),
                f"positions of segment {segments[a]} (rows {a}..{b - 1}) must be consecutive "
                f"for context-parallel sharding")
        lengths.append(int(b - a))
        first_positions.append(int(run[0]))
        ids.append(int(segments[a]))
    require(len(set(ids)) == len(ids), f"segment ids {ids}: each segment must be one run")
    return lengths, first_positions, ids


def _local(cache: KVCache) -> KVCache:
    """A rank's cache shard inside ``shard_map`` with its fill count as a scalar."""
    return cache._replace(fill=cache.fill[0])


def _global(cache: KVCache) -> KVCache:
    return cache._replace(fill=cache.fill[None])


@dataclasses.dataclass
class ContextParallelEngine(Engine):
    """``Engine`` whose prefill, scoring, logits and decode run context-parallel on ``mesh``.

    Attributes (in addition to ``Engine``'s):
      mesh: a mesh with axes ``context`` and ``tensor`` (``cpjax.parallel.mesh.make_mesh``).
      strategy: prefill ring, ``pass_kv``, ``pass_q`` or ``all_gather``.
      decode_strategy: ``allreduce`` or ``ring_pass_q``.
    """

    mesh: Mesh = None
    strategy: str = "pass_kv"
    decode_strategy: str = "allreduce"

    def __post_init__(self):
        require(self.mesh is not None, "ContextParallelEngine needs a mesh")
        if self.strategy not in STRATEGIES:
            raise CpjaxError(f"unknown context-parallel strategy {self.strategy!r}: choose one "
                             f"of {', '.join(STRATEGIES)}")
        if self.decode_strategy not in DECODE_STRATEGIES:
            raise CpjaxError(f"unknown decode strategy {self.decode_strategy!r}: choose one of "
                             f"{', '.join(DECODE_STRATEGIES)}")
        self.n_context = self.mesh.shape[CONTEXT]
        self.n_tensor = self.mesh.shape[TENSOR]
        check_tensor_divisibility(self.config, self.n_tensor)
        super().__post_init__()
        self.base_attend = get_attend(self.attention)
        self.param_specs = tree_specs(PARAM_AXES, self.params)
        self.sharded_params = jax.tree.map(
            lambda x, s: jax.device_put(x, NamedSharding(self.mesh, s)), self.params,
            self.param_specs)
        row = P(CONTEXT)
        kv = spec(KV_AXES)
        self.cache_specs = KVCache(k=kv, v=kv, pos=row, seg=row, fill=row)
        ps = self.param_specs
        self._cp_score = self._shard(self._cp_score_local, (ps, row, row, row, row), row)
        self._cp_logits = self._shard(self._cp_logits_local, (ps, row, row, row),
                                      P(CONTEXT, None))
        self._cp_prefill = self._shard(self._cp_prefill_local,
                                       (ps, row, row, row, self.cache_specs),
                                       (P(CONTEXT, None), self.cache_specs), donate=(4,))
        decode_local = {"allreduce": self._allreduce_decode_local,
                        "ring_pass_q": self._ring_decode_local}[self.decode_strategy]
        self._cp_decode = self._shard(decode_local, (ps, P(), P(), P(), self.cache_specs),
                                      (P(), self.cache_specs), donate=(4,))

    def _shard(self, fn, in_specs, out_specs, donate=()):
        """``jit(shard_map(fn))`` over the mesh.

        check_vma=False: user attention kernels (loops whose carries start as constants) need
        not annotate which mesh axes their values vary over.
        """
        return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                                     out_specs=out_specs, check_vma=False),
                       donate_argnums=donate)

    def _model(self, attention) -> Llama:
        return Llama(self.config, attention, self.dtype, tensor_axis=TENSOR,
                     tensor_size=self.n_tensor)

    def _ring_model(self, strategy=None) -> Llama:
        return self._model(ring_attention(strategy or self.strategy, self.base_attend, CONTEXT,
                                          self.n_context))

    # ----------------------------------------------------------------- per-rank bodies
    def _cp_score_local(self, params, tokens, targets, positions, segments):
        hidden = self._ring_model().apply({"params": params}, tokens, positions, segments).hidden
        return self._logprobs(params, hidden, targets)

    def _cp_logits_local(self, params, tokens, positions, segments):
        hidden = self._ring_model().apply({"params": params}, tokens, positions, segments).hidden
        return self._head(params, hidden)

    def _cp_prefill_local(self, params, tokens, positions, segments, cache: KVCache):
        local = _local(cache)
        out = self._ring_model().apply({"params": params}, tokens, positions, segments,
                                       local.as_past())
        local = kv_cache.append(local, out.k, out.v, positions, segments, tokens.shape[0])
        return out.hidden, _global(local)

    def _decode_owner(self, step):
        rank = jax.lax.axis_index(CONTEXT)
        return rank == step % self.n_context

    def _allreduce_decode_local(self, params, token, position, step, cache: KVCache):
        """Replicated-query decode: attend the local shard, merge across ranks, store on owner."""
        is_owner = self._decode_owner(step)
        local = _local(cache)
        model = self._model(allreduce_decode_attention(self.base_attend, CONTEXT, is_owner))
        tokens, positions = token[None], position[None]
        out = model.apply({"params": params}, tokens, positions, jnp.zeros((1,), jnp.int32),
                          local.as_past())
        logits = self._head(params, out.hidden[0])
        seg = jnp.where(is_owner, 0, kv_cache.EMPTY_SEGMENT)[None]
        local = kv_cache.append(local, out.k, out.v, positions, seg, is_owner.astype(jnp.int32))
        return jnp.argmax(logits).astype(jnp.int32), _global(local)

    def _ring_decode_local(self, params, token, position, step, cache: KVCache):
        """The paper's decode: one query slot per rank, the real one on the owner; pass-Q ring."""
        is_owner = self._decode_owner(step)
        local = _local(cache)
        seg = jnp.where(is_owner, 0, kv_cache.EMPTY_SEGMENT)[None]
        tokens, positions = token[None], position[None]
        out = self._ring_model("pass_q").apply({"params": params}, tokens, positions, seg,
                                               local.as_past())
        logits = self._head(params, out.hidden[0])
        local = kv_cache.append(local, out.k, out.v, positions, seg, is_owner.astype(jnp.int32))
        # Only the owner's logits are real: every rank contributes, non-owners with zeros.
        owner_logits = jax.lax.psum(jnp.where(is_owner, logits, 0.0), CONTEXT)
        return jnp.argmax(owner_logits).astype(jnp.int32), _global(local)

    # ----------------------------------------------------------------- layouts and placement
    def _layout(self, lengths, start_positions=None, segment_ids=None) -> Layout:
        """Balanced layout whose per-rank length is a multiple of 2 * (bucket / 2N) rows."""
        per_chunk = max(1, self.bucket // (2 * self.n_context))
        return balanced_layout(lengths, self.n_context, start_positions, segment_ids,
                               pad_multiple=per_chunk)

    def _place(self, *arrays):
        sharding = NamedSharding(self.mesh, P(CONTEXT))
        return [jax.device_put(np.asarray(a), sharding) for a in arrays]

    # ----------------------------------------------------------------- public API
    def prefill_slots(self, n_tokens: int) -> int:
        return self._layout([n_tokens]).source.size

    def new_cache(self, capacity: int) -> KVCache:
        """A cache sharded over the context axis with room for ``capacity`` tokens in all.

        Each rank gets ``ceil(capacity / N) + 1`` slots (rounded up to 64): prefills fill every
        rank equally and decode places tokens round-robin, so no rank needs more.
        """
        per_rank = round_up(-(-capacity // self.n_context) + 1, 64)
        hkv = self.config.n_kv_heads
        cache = kv_cache.init_cache(self.config, per_rank * self.n_context, self.dtype, hkv)
        cache = cache._replace(fill=jnp.zeros((self.n_context,), jnp.int32))
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(self.mesh, s)), cache,
                            self.cache_specs)

    def rank_fill(self, cache: KVCache) -> list[int]:
        """Slots used on each rank."""
        return [int(f) for f in np.asarray(cache.fill)]

    def logits(self, ids, positions=None, segments=None) -> np.ndarray:
        ids = validate_token_ids(ids, self.config.vocab_size)
        t = ids.size
        positions = np.arange(t, dtype=np.int32) if positions is None else np.asarray(positions)
        segments = np.zeros(t, np.int32) if segments is None else np.asarray(segments)
        require(positions.shape == (t,) and segments.shape == (t,),
                f"positions/segments must have shape ({t},) like the ids, got "
                f"{positions.shape} and {segments.shape}")
        require(bool((segments >= 0).all()), "segments: padding (negative ids) is added by the "
                "context-parallel layout itself; pass only real tokens")
        layout = self._layout(*segment_runs(positions, segments))
        args = self._place(layout.shard(ids), layout.positions, layout.segments)
        return layout.unshard(np.asarray(self._cp_logits(self.sharded_params, *args)))

    def score(self, ids) -> np.ndarray:
        ids = validate_token_ids(ids, self.config.vocab_size)
        require(ids.size >= 2, f"score needs at least 2 tokens, got {ids.size}")
        self.check_length(ids.size)
        per_chunk = round_up(SCORE_CHUNK, 2 * self.n_context) // (2 * self.n_context)
        layout = balanced_layout([ids.size - 1], self.n_context, pad_multiple=per_chunk)
        args = self._place(layout.shard(ids[:-1]), layout.shard(ids[1:]), layout.positions,
                           layout.segments)
        lp = self._cp_score(self.sharded_params, *args)
        return layout.unshard(np.asarray(lp, np.float32))

    def prefill(self, ids, cache: KVCache, start_position: int = 0):
        """Context-parallel (partial) prefill of ``ids`` at ``start_position`` into ``cache``.

        The new tokens are load-balanced over the ranks regardless of where earlier turns put
        the cached ones. Returns ``(logits [V] of the last token, cache)``.
        """
        ids = validate_token_ids(ids, self.config.vocab_size)
        layout = self._layout([ids.size], [start_position])
        fills = self.rank_fill(cache)
        per_rank = cache.capacity // self.n_context
        require(max(fills) + layout.local_len <= per_rank,
                f"KV cache overflow: a rank holds {max(fills)} of its {per_rank} slots and this "
                f"prefill adds {layout.local_len} per rank ({ids.size} tokens over "
                f"{self.n_context} ranks); create the cache with a larger capacity")
        args = self._place(layout.shard(ids), layout.positions, layout.segments)
        hidden, cache = self._cp_prefill(self.sharded_params, *args, cache)
        last_slot = int(np.flatnonzero(layout.source == ids.size - 1)[0])
        last_hidden = jax.device_put(hidden[last_slot], jax.devices()[0])
        return self._head(self.params, last_hidden), cache

    def prefill_prompt(self, ids, cache: KVCache):
        """One context-parallel prefill of the whole prompt (the mesh bounds the memory)."""
        return self.prefill(ids, cache)

    def decode_step(self, token, position: int, step: int, cache: KVCache):
        per_rank = cache.capacity // self.n_context
        owner = step % self.n_context
        require(self.rank_fill(cache)[owner] < per_rank,
                f"KV cache overflow: rank {owner} has used all {per_rank} of its slots; create "
                f"the cache with a larger capacity")
        replicated = NamedSharding(self.mesh, P())
        scalars = [jax.device_put(np.asarray(x, np.int32), replicated)
                   for x in (token, position, step)]
        return self._cp_decode(self.sharded_params, *scalars, cache)
