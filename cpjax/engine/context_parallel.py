"""Context-parallel prefill and scoring: the Llama forward under ``shard_map`` on a mesh.

Tokens are permuted into the load-balanced layout (``cpjax.parallel.layout``) before the
embedding, sharded over the ``context`` axis, and every attention call is a ring strategy
(``cpjax.parallel.ring``); RoPE and masks use the true global positions that travel with the
tokens; outputs are permuted back at the end. Parameters are sharded over the ``tensor`` axis
by the rules table (heads and FFN columns), replicated over ``context``.

Decoding after a context-parallel prefill gathers the cache onto one device and reuses the
single-device decode step (the cache keeps the layout order: masks come from positions, so the
order of cache slots does not matter).
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
from cpjax.parallel.ring import STRATEGIES, context_parallel_attend
from cpjax.parallel.sharding import spec, tree_specs


def check_tensor_divisibility(config, tensor: int) -> None:
    """Heads, KV heads and the FFN width must split evenly over the tensor axis."""
    for name, value in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
                        ("ffn_dim", config.ffn_dim)):
        require(value % tensor == 0,
                f"tensor={tensor} does not divide {name}={value} of model {config.name!r}; "
                f"choose a tensor size that divides the number of heads and KV heads")


def segment_runs(positions: np.ndarray, segments: np.ndarray):
    """Split a packed row into its sequences: ``(lengths, start_positions, segment_ids)``.

    Each run of equal segment ids must hold consecutive positions; padding (segment < 0) may
    only trail the row and is dropped by the caller beforehand.
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


@dataclasses.dataclass
class ContextParallelEngine(Engine):
    """``Engine`` whose prefill, scoring and logits run context-parallel on ``mesh``.

    Attributes (in addition to ``Engine``'s):
      mesh: a mesh with axes ``context`` and ``tensor`` (``cpjax.parallel.mesh.make_mesh``).
      strategy: ``pass_kv``, ``pass_q`` or ``all_gather``.
    """

    mesh: Mesh = None
    strategy: str = "pass_kv"

    def __post_init__(self):
        require(self.mesh is not None, "ContextParallelEngine needs a mesh")
        if self.strategy not in STRATEGIES:
            raise CpjaxError(f"unknown context-parallel strategy {self.strategy!r}: choose one "
                             f"of {', '.join(STRATEGIES)}")
        self.n_context = self.mesh.shape[CONTEXT]
        self.n_tensor = self.mesh.shape[TENSOR]
        check_tensor_divisibility(self.config, self.n_tensor)
        super().__post_init__()
        ring_attend = context_parallel_attend(self.strategy, get_attend(self.attention),
                                              CONTEXT, self.n_context)
        self.cp_model = Llama(self.config, ring_attend, self.dtype,
                              tensor_axis=TENSOR, tensor_size=self.n_tensor)
        param_specs = tree_specs(PARAM_AXES, self.params)
        self.sharded_params = jax.tree.map(
            lambda x, s: jax.device_put(x, NamedSharding(self.mesh, s)), self.params,
            param_specs)
        row = P(CONTEXT)
        # check_vma=False: user attention kernels (loops whose carries start as constants)
        # need not annotate which mesh axes their values vary over.
        shard = lambda f, ins, outs: jax.jit(jax.shard_map(  # noqa: E731
            f, mesh=self.mesh, in_specs=ins, out_specs=outs, check_vma=False))
        self._cp_score = shard(self._cp_score_local, (param_specs, row, row, row, row), row)
        self._cp_logits = shard(self._cp_logits_local, (param_specs, row, row, row),
                                P(CONTEXT, None))
        kv = spec(KV_AXES)
        self._cp_prefill = shard(self._cp_prefill_local, (param_specs, row, row, row),
                                 (P(CONTEXT, None), kv, kv))

    # ----------------------------------------------------------------- per-rank bodies
    def _cp_trunk(self, params, tokens, positions, segments):
        return self.cp_model.apply({"params": params}, tokens, positions, segments)

    def _cp_score_local(self, params, tokens, targets, positions, segments):
        hidden = self._cp_trunk(params, tokens, positions, segments).hidden
        return self._logprobs(params, hidden, targets)

    def _cp_logits_local(self, params, tokens, positions, segments):
        return self._head(params, self._cp_trunk(params, tokens, positions, segments).hidden)

    def _cp_prefill_local(self, params, tokens, positions, segments):
        out = self._cp_trunk(params, tokens, positions, segments)
        return out.hidden, out.k, out.v

    # ----------------------------------------------------------------- layouts
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

    def prefill_prompt(self, ids, cache: KVCache):
        """One context-parallel prefill of the whole prompt (the mesh bounds the memory)."""
        return self.prefill(ids, cache)

    def prefill(self, ids, cache: KVCache, start_position: int = 0):
        ids = validate_token_ids(ids, self.config.vocab_size)
        require(int(cache.fill) == 0,
                "context-parallel prefill into a non-empty cache (partial prefill) is not "
                "available yet; start from an empty cache")
        layout = self._layout([ids.size], [start_position])
        require(layout.source.size <= cache.capacity,
                f"KV cache overflow: {ids.size} tokens (padded to {layout.source.size}) exceed "
                f"the capacity of {cache.capacity}; create the cache with a larger capacity")
        args = self._place(layout.shard(ids), layout.positions, layout.segments)
        hidden, k, v = self._cp_prefill(self.sharded_params, *args)
        device = jax.devices()[0]
        last_slot = int(np.flatnonzero(layout.source == ids.size - 1)[0])
        logits = self._head(self.params, jax.device_put(hidden[last_slot], device))
        k, v = jax.device_put((k, v), device)
        cache = kv_cache.append(cache, k, v, jnp.asarray(layout.positions),
                                jnp.asarray(layout.segments), layout.source.size)
        return logits, cache
