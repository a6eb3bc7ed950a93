"""Context-parallel inference: the Llama forward under ``shard_map`` with a sharded KV cache.

* Prefill (full or partial): the new tokens are permuted into the load-balanced layout
  (``cpjax.parallel.layout``) and sharded over the ``context`` axis; every attention call is a
  ring (``cpjax.parallel.ring.ring_attention``) over each rank's cache shard plus its new rows;
  RoPE and masks use the true global positions; each rank appends its new K/V to its own cache
  shard, where they stay (persistent KV: a follow-up turn is a partial prefill).
* Decode of ``B`` sequences, two exact ways (``decode_strategy``):
  ``ring_pass_q`` — the paper's: the queries are padded to ``ceil(B / N)`` per rank, each on the
  rank that owns its token, a pass-Q ring visits every cache shard and one all-to-all returns
  the partials;
  ``allreduce`` — every rank runs the (cheap) linear layers for all new tokens, attends its own
  shard, and the partials merge in one ``pmax``/``psum``; no ring, no all-to-all.
  In both, token ``b``'s K/V is stored on its owner, round-robin shifted by one each step (the
  paper's ``(b + step) mod N`` when the caches are even; ``decode_owners``), so the caches stay
  balanced.
* Parameters are sharded over the ``tensor`` axis by the rules table (heads, FFN columns).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cpjax.attention import get_attend
from cpjax.engine import kv_cache
from cpjax.engine import sampling as sampling_lib
from cpjax.engine.engine import SCORE_CHUNK, Engine, round_up
from cpjax.engine.kv_cache import KVCache
from cpjax.engine.sampling import Sampling
from cpjax.errors import CpjaxError, require
from cpjax.hardware import get_hardware
from cpjax.model.llama import KV_AXES, Llama, param_axes
from cpjax.parallel.distributed import fetch, put
from cpjax.parallel.layout import Layout, balanced_layout
from cpjax.parallel.mesh import CONTEXT, TENSOR
from cpjax.parallel.heuristic import choose_strategy
from cpjax.parallel.ring import STRATEGIES, allreduce_decode_attention, ring_attention
from cpjax.parallel.sharding import spec, tree_specs

DECODE_STRATEGIES = ("allreduce", "ring_pass_q")
WINDOW_ROWS = 256   # granularity of the cache window a prefill attends (see _cache_window)


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


def decode_owners(fills, step, batch: int):
    """Rank that stores (and, in ring decode, computes) each of ``batch`` new tokens: ``[batch]``.

    Round-robin with the start shifted by one each step, as in the paper, but aware of the
    cache fills: in each round of up to N tokens, the least-filled ranks go first, ties broken
    in round-robin order from ``step``. With equal fills this is exactly the paper's
    ``(b + step) mod N``; after uneven turns it steers new tokens to the emptier ranks. No rank
    gets more than ``ceil(batch / N)`` tokens.

    Args: ``fills [N]`` int32 slots used per rank, ``step`` int32 scalar.
    """
    n = fills.shape[0]
    key = fills * n + (jnp.arange(n) - step) % n
    owners = []
    for first in range(0, batch, n):
        ranks = jnp.argsort(key)[:min(n, batch - first)]
        owners.append(ranks)
        key = key.at[ranks].add(n)
    return jnp.concatenate(owners).astype(jnp.int32)


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
      strategy: prefill ring, ``pass_kv``, ``pass_q``, ``all_gather``, or ``auto`` (the
        paper's heuristic, ``cpjax.parallel.heuristic``, decides per call from the new and
        cached token counts).
      decode_strategy: ``allreduce`` or ``ring_pass_q``.
      hardware: figures for ``auto`` (``cpjax.hardware`` preset name; default ``cpu``, a
        measurement of this machine, or ``h100-nvlink`` on GPU).
    """

    mesh: Mesh = None
    strategy: str = "pass_kv"
    decode_strategy: str = "allreduce"
    hardware: str = None

    def __post_init__(self):
        require(self.mesh is not None, "ContextParallelEngine needs a mesh")
        if self.strategy not in (*STRATEGIES, "auto"):
            raise CpjaxError(f"unknown context-parallel strategy {self.strategy!r}: choose one "
                             f"of {', '.join(STRATEGIES)}, auto")
        if self.decode_strategy not in DECODE_STRATEGIES:
            raise CpjaxError(f"unknown decode strategy {self.decode_strategy!r}: choose one of "
                             f"{', '.join(DECODE_STRATEGIES)}")
        self.n_context = self.mesh.shape[CONTEXT]
        self.n_tensor = self.mesh.shape[TENSOR]
        check_tensor_divisibility(self.config, self.n_tensor)
        super().__post_init__()
        self.base_attend = get_attend(self.attention)
        self._head_on_mesh = jax.jit(self._head)
        row = P(CONTEXT)
        kv = spec(KV_AXES)
        self.cache_specs = KVCache(k=kv, v=kv, pos=row, seg=row, fill=row)
        ps = self.param_specs
        cs = self.cache_specs
        self._cp_score, self._cp_logits = (
            {strategy: self._shard(functools.partial(body, strategy), in_specs, out_specs)
             for strategy in STRATEGIES}
            for body, in_specs, out_specs in (
                (self._cp_score_local, (ps, row, row, row, row), row),
                (self._cp_logits_local, (ps, row, row, row), P(CONTEXT, None))))
        # Prefills compile per (strategy, cache window): see ``_cache_window``.
        self._prefill_specs = {
            "prefill": (self._cp_prefill_local, (ps, row, row, row, cs),
                        (P(CONTEXT, None), cs), (4,)),
            "logprobs": (self._cp_prefill_logprobs_local, (ps, row, row, row, row, cs),
                         (row, cs), (5,))}
        self._prefill_fns = {}
        decode_local = {"allreduce": self._allreduce_decode_local,
                        "ring_pass_q": self._ring_decode_local}[self.decode_strategy]
        self._cp_decode = self._shard(decode_local,
                                      (ps, P(), P(), P(), P(), self.cache_specs, P(), P(), P(),
                                       P()),
                                      (P(), P(), self.cache_specs), donate=(5,))

    def _place_params(self, params):
        """The parameters in ``dtype``, sharded over the mesh by the rules table; never
        gathered on one device (a checkpoint restored onto the mesh stays where it is)."""
        self.param_specs = tree_specs(param_axes(self.config), params)
        return jax.tree.map(lambda x, s: put(x, NamedSharding(self.mesh, s), self.dtype),
                            params, self.param_specs)

    def _shard(self, fn, in_specs, out_specs, donate=()):
        """``jit(shard_map(fn))`` over the mesh.

        check_vma=False: user attention kernels (loops whose carries start as constants) need
        not annotate which mesh axes their values vary over.
        """
        return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                                     out_specs=out_specs, check_vma=False),
                       donate_argnums=donate)

    def _model(self, attention) -> Llama:
        return Llama(self.config, attention, self.dtype,
                     mesh_axis_sizes=tuple(self.mesh.shape.items()))

    def _ring_model(self, strategy=None) -> Llama:
        return self._model(ring_attention(strategy or self.strategy, self.base_attend, CONTEXT,
                                          self.n_context))

    # ----------------------------------------------------------------- per-rank bodies
    def _cp_score_local(self, strategy, params, tokens, targets, positions, segments):
        hidden = self._ring_model(strategy).apply({"params": params}, tokens, positions,
                                                  segments).hidden
        return self._logprobs(params, hidden, targets)

    def _cp_logits_local(self, strategy, params, tokens, positions, segments):
        hidden = self._ring_model(strategy).apply({"params": params}, tokens, positions,
                                                  segments).hidden
        return self._head(params, hidden)

    def _cp_prefill_logprobs_local(self, strategy, window, params, tokens, targets, positions,
                                   segments, cache: KVCache):
        hidden, cache = self._cp_prefill_local(strategy, window, params, tokens, positions,
                                               segments, cache)
        return self._logprobs(params, hidden, targets), cache

    def _cp_prefill_local(self, strategy, window, params, tokens, positions, segments,
                          cache: KVCache):
        """Ring forward of this rank's new rows against the first ``window`` slots of its cache
        shard; appends their real rows (padding dropped)."""
        local = _local(cache)
        past = None
        if window:
            past = kv_cache.PastKV(local.k[:, :window], local.v[:, :window],
                                   local.pos[:window], local.seg[:window])
        out = self._ring_model(strategy).apply({"params": params}, tokens, positions, segments,
                                               past)
        real = segments >= 0
        order = jnp.argsort(~real, stable=True)     # real rows first; the rest is overwritten
        local = kv_cache.append(local, out.k[:, order], out.v[:, order], positions[order],
                                segments[order], real.sum().astype(jnp.int32))
        return out.hidden, _global(local)

    def _store_owned(self, local: KVCache, out, positions, segments, owned):
        """Append the new K/V rows this rank owns (``owned [B]``), owned rows first.

        ``ceil(B / N)`` rows are written (no rank owns more); the unowned among them carry the
        empty segment and are overwritten by the next append.
        """
        per_rank = -(-owned.shape[0] // self.n_context)
        order = jnp.argsort(~owned, stable=True)[:per_rank]
        seg = jnp.where(owned, segments, kv_cache.EMPTY_SEGMENT)[order]
        return kv_cache.append(local, out.k[:, order], out.v[:, order], positions[order], seg,
                               owned.sum().astype(jnp.int32))

    def _allreduce_decode_local(self, params, tokens, positions, segments, step,
                                cache: KVCache, key, temperature, top_k, top_p):
        """Replicated-query decode: every rank runs all ``B`` tokens, attends its cache shard,
        and the partials merge across ranks; each token is stored on its ``decode_owners``."""
        rank = jax.lax.axis_index(CONTEXT)
        batch = jnp.arange(tokens.shape[0])
        local = _local(cache)
        fills = jax.lax.all_gather(local.fill, CONTEXT)
        owned = decode_owners(fills, step, tokens.shape[0]) == rank
        model = self._model(allreduce_decode_attention(self.base_attend, CONTEXT, owned))
        out = model.apply({"params": params}, tokens, positions, segments, local.as_past())
        logits = self._head(params, out.hidden)
        next_tokens = sampling_lib.sample(logits, key, step + 1, batch, temperature, top_k, top_p)
        local = self._store_owned(local, out, positions, segments, owned)
        return logits, next_tokens, _global(local)

    def _ring_decode_local(self, params, tokens, positions, segments, step, cache: KVCache,
                           key, temperature, top_k, top_p):
        """The paper's batched ring pass-Q decode.

        Each rank takes the queries of the tokens it owns (``decode_owners``: round-robin,
        shifted by one each step), padded to ``ceil(B / N)`` slots; a pass-Q ring visits every
        cache shard, one all-to-all returns the partials, and the ranks exchange their sampled
        tokens and logits. Each token's K/V stays on the rank that computed it.
        """
        n, b = self.n_context, tokens.shape[0]
        per_rank = -(-b // n)
        rank = jax.lax.axis_index(CONTEXT)
        local = _local(cache)
        owners = decode_owners(jax.lax.all_gather(local.fill, CONTEXT), step, b)
        mine = jnp.argsort(owners != rank, stable=True)[:per_rank]   # my tokens first
        real = owners[mine] == rank
        my_tokens, my_positions = tokens[mine], positions[mine]
        my_segments = jnp.where(real, segments[mine], kv_cache.EMPTY_SEGMENT)
        out = self._ring_model("pass_q").apply({"params": params}, my_tokens, my_positions,
                                               my_segments, local.as_past())
        logits = self._head(params, out.hidden)
        next_tokens = sampling_lib.sample(logits, key, step + 1, mine, temperature, top_k,
                                          top_p)
        local = kv_cache.append(local, out.k, out.v, my_positions, my_segments,
                                real.sum().astype(jnp.int32))
        gather = functools.partial(jax.lax.all_gather, axis_name=CONTEXT, tiled=True)
        where = gather(jnp.where(real, mine, b))                # b = not a real token: dropped
        all_tokens = jnp.zeros((b,), jnp.int32).at[where].set(gather(next_tokens), mode="drop")
        all_logits = jnp.zeros((b, logits.shape[-1]), logits.dtype).at[where].set(
            gather(logits), mode="drop")
        return all_logits, all_tokens, _global(local)

    # ----------------------------------------------------------------- layouts and placement
    def _layout(self, lengths, start_positions=None, segment_ids=None) -> Layout:
        """Balanced layout whose per-rank length is a multiple of 2 * (bucket / 2N) rows."""
        per_chunk = max(1, self.bucket // (2 * self.n_context))
        return balanced_layout(lengths, self.n_context, start_positions, segment_ids,
                               pad_multiple=per_chunk)

    def _prefill_fn(self, kind: str, strategy: str, window: int):
        """The compiled prefill ``kind`` (``prefill`` or ``logprobs``) for a cache window."""
        key = (kind, strategy, window)
        if key not in self._prefill_fns:
            body, in_specs, out_specs, donate = self._prefill_specs[kind]
            self._prefill_fns[key] = self._shard(functools.partial(body, strategy, window),
                                                 in_specs, out_specs, donate)
        return self._prefill_fns[key]

    def _cache_window(self, cache: KVCache, fills) -> int:
        """Cache slots per rank a prefill attends (and pass-KV circulates): the fullest rank's
        fill rounded up to ``WINDOW_ROWS``, not the whole capacity; 0 for an empty cache.

        This is the paper's ``max_j P_j`` message; the rounding bounds recompilation to one
        program per ``WINDOW_ROWS`` of cache growth.
        """
        per_rank = cache.capacity // self.n_context
        top = max(fills)
        return 0 if top == 0 else min(per_rank, round_up(top, WINDOW_ROWS))

    def _plan_prefill(self, kind: str, lengths, starts, segments, cache: KVCache):
        """``(layout, compiled program)`` of a (partial) prefill of sequences of ``lengths``:
        checks that each continues its segment and that the cache has room, places the layout
        on the emptiest shards, and picks the ring and the cache window."""
        self._check_turns(cache, segments, starts)
        fills = self.rank_fill(cache)
        layout = self._placed_layout(self._layout(lengths, starts, segments), fills)
        per_rank = cache.capacity // self.n_context
        n_new = sum(lengths)
        require(max(fills) + layout.local_len <= per_rank,
                f"KV cache overflow: a rank holds {max(fills)} of its {per_rank} slots and this "
                f"prefill adds {layout.local_len} per rank ({n_new} tokens over "
                f"{self.n_context} ranks); create the cache with a larger capacity")
        strategy = self.strategy_for(n_new, sum(fills))
        return layout, self._prefill_fn(kind, strategy, self._cache_window(cache, fills))

    @staticmethod
    def _placed_layout(layout: Layout, fills) -> Layout:
        """``layout`` rotated over the ranks so the fullest cache shard stays as small as it
        can (a short turn's tokens go to the ranks that hold the fewest)."""
        real = layout.real_per_rank()
        fills = np.asarray(fills)
        best = min(range(layout.n_ranks),
                   key=lambda shift: (int((fills + np.roll(real, shift)).max()), shift))
        return layout.rotated(best)

    def _place(self, *arrays):
        sharding = NamedSharding(self.mesh, P(CONTEXT))
        return [put(a, sharding) for a in arrays]

    # ----------------------------------------------------------------- public API
    def prefill_slots(self, n_tokens: int) -> int:
        return self._layout([n_tokens]).source.size

    def new_cache(self, capacity: int) -> KVCache:
        """A cache sharded over the context axis with room for ``capacity`` tokens in all.

        Each rank gets ``ceil(capacity / N) + 1`` slots (rounded up to 64): prefills fill every
        rank equally and decode places tokens round-robin, so no rank needs more.
        """
        self._check_capacity(capacity)
        per_rank = round_up(-(-capacity // self.n_context) + 1, 64)
        hkv = self.config.n_kv_heads
        def empty() -> KVCache:
            cache = kv_cache.init_cache(self.config, per_rank * self.n_context, self.dtype, hkv)
            return cache._replace(fill=jnp.zeros((self.n_context,), jnp.int32))
        shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.cache_specs)
        return jax.jit(empty, out_shardings=shardings)()

    def rank_fill(self, cache: KVCache) -> list[int]:
        """Slots used on each rank."""
        return [int(f) for f in fetch(cache.fill)]

    def _run_logits(self, ids, positions, segments) -> np.ndarray:
        layout = self._layout(*segment_runs(positions, segments))
        args = self._place(layout.shard(ids), layout.positions, layout.segments)
        logits = self._cp_logits[self.strategy_for(ids.size, 0)](self.params, *args)
        return layout.unshard(fetch(logits))

    def _score_whole(self, ids: np.ndarray) -> np.ndarray:
        per_chunk = round_up(SCORE_CHUNK, 2 * self.n_context) // (2 * self.n_context)
        layout = balanced_layout([ids.size - 1], self.n_context, pad_multiple=per_chunk)
        args = self._place(layout.shard(ids[:-1]), layout.shard(ids[1:]), layout.positions,
                           layout.segments)
        lp = self._cp_score[self.strategy_for(ids.size - 1, 0)](self.params, *args)
        return layout.unshard(fetch(lp).astype(np.float32))

    def strategy_for(self, new_tokens: int, cached_tokens: int) -> str:
        """The prefill ring used for ``new_tokens`` after ``cached_tokens`` (see ``strategy``)."""
        if self.strategy != "auto":
            return self.strategy
        if self.hardware is None:
            self.hardware = "h100-nvlink" if jax.default_backend() == "gpu" else "cpu"
        return choose_strategy(new_tokens, cached_tokens, self.config, self.n_context,
                               get_hardware(self.hardware),
                               bytes_per_element=jnp.dtype(self.dtype).itemsize)

    def _run_prefill_batch(self, ids, segments, starts, cache: KVCache):
        """Context-parallel (partial) prefill of a fused batch (see ``Engine.prefill_batch``).

        The new tokens of each sequence are load-balanced over the ranks on their own (paper
        Fig. 2), wherever earlier turns put the cached ones, and stay where they land.
        """
        layout, program = self._plan_prefill("prefill", [x.size for x in ids], starts, segments,
                                             cache)
        args = self._place(layout.shard(np.concatenate(ids)), layout.positions, layout.segments)
        hidden, cache = program(self.params, *args, cache)
        last = np.cumsum([x.size for x in ids]) - 1
        slots = np.array([np.flatnonzero(layout.source == i)[0] for i in last])
        last_hidden = fetch(hidden[slots])
        return self._head_on_mesh(self.params, last_hidden), cache

    def _run_prefill_logprobs(self, ids, targets, cache: KVCache, start_position: int,
                              segment: int):
        layout, program = self._plan_prefill("logprobs", [ids.size], [start_position], [segment],
                                             cache)
        args = self._place(layout.shard(ids), layout.shard(targets), layout.positions,
                           layout.segments)
        lp, cache = program(self.params, *args, cache)
        return layout.unshard(fetch(lp).astype(np.float32)), cache

    def prefill_prompt(self, ids, cache: KVCache, start_position: int = 0, segment: int = 0):
        """One context-parallel (partial) prefill of the whole prompt (the mesh bounds memory)."""
        return self.prefill(ids, cache, start_position, segment)

    def _check_decode_room(self, cache: KVCache, batch: int) -> None:
        per_rank = cache.capacity // self.n_context
        fills = self.rank_fill(cache)
        require(max(fills) + -(-batch // self.n_context) <= per_rank,
                f"KV cache overflow: a rank has used {max(fills)} of its {per_rank} slots; "
                f"create the cache with a larger capacity")

    def _run_decode(self, tokens, positions, segments, step: int, cache: KVCache,
                    sampling: Sampling):
        replicated = NamedSharding(self.mesh, P())
        args = [put(x, replicated) for x in
                (tokens, positions, segments, np.int32(step), *sampling.as_arrays())]
        return self._cp_decode(self.params, *args[:4], cache, *args[4:])
