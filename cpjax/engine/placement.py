"""Where an engine's parameters, KV cache and token rows live, and how its steps compile.

A placement owns everything that differs between one device and a context-parallel mesh:
placing the parameters, creating the cache, the row layout (``cpjax.parallel.layout``), the
cache-room checks, the prefill ring for a call, and compiling a step body of
``cpjax.engine.steps`` (``jit``, or ``jit(shard_map(...))`` with the partition specs of each
argument kind). The engine (``cpjax.engine.engine``) is written once over this interface.

Argument kinds of a compiled step: ``params`` (the parameter pytree), ``rows`` (a packed row
in layout order, sharded over ranks), ``cache`` (a :class:`KVCache`, sharded over ranks) and
``replicated`` (the same on every rank).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cpjax.config import ModelConfig
from cpjax.dispatch import AttentionImpl
from cpjax.engine import kv_cache
from cpjax.engine.kv_cache import KVCache
from cpjax.engine.steps import Forward
from cpjax.errors import require
from cpjax.hardware import get_hardware
from cpjax.model.decoder import KV_AXES, param_axes
from cpjax.names import DECODE_STRATEGIES, PREFILL_STRATEGIES, check_choice
from cpjax.parallel.distributed import fetch, put
from cpjax.parallel.heuristic import choose_strategy
from cpjax.parallel.layout import Layout, balanced_layout, padded_layout, segment_runs
from cpjax.parallel.mesh import CONTEXT, SINGLE_RANK, TENSOR, Ranks
from cpjax.parallel.ring import chunk_rows_multiple
from cpjax.parallel.sharding import spec, split_over, tree_specs

WINDOW_ROWS = 256  # granularity of the cache window a context-parallel prefill attends


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (and >= ``multiple``)."""
    return max(multiple, -(-n // multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class SingleDevice:
    """Everything on the default device; steps compile with ``jit``.

    A long prompt is prefilled in chunks of ``prefill_chunk`` tokens (each a partial prefill
    against the cache the previous ones filled), so memory stays bounded.
    """

    prefill_chunk: Optional[int] = 2048
    decode_strategy = "allreduce"  # not a field: one rank decodes by plain attention

    n_ranks = 1

    def __post_init__(self):
        require(
            self.prefill_chunk is None
            or (isinstance(self.prefill_chunk, int) and self.prefill_chunk >= 1),
            f"prefill_chunk={self.prefill_chunk!r}: must be an int >= 1 (tokens) or None",
        )

    def check_model(self, config: ModelConfig) -> None:
        """Nothing to check: any model runs on one device."""

    def forward(self, config: ModelConfig, dtype, attention: AttentionImpl) -> Forward:
        return Forward(config, dtype, attention, SINGLE_RANK)

    def place_params(self, params, config: ModelConfig, dtype):
        """The parameters in ``dtype`` on the default device."""
        return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)

    def optimizer_state_shardings(self, params, config: ModelConfig):
        """``None``: one device holds the optimizer state (see ``ContextParallel``)."""
        return None

    def new_cache(self, config: ModelConfig, capacity: int, dtype) -> KVCache:
        return kv_cache.init_cache(config, capacity, dtype)

    def compile(self, fn: Callable, in_kinds, out_kinds, config, params, donate=()) -> Callable:
        del in_kinds, out_kinds, config, params
        return jax.jit(fn, donate_argnames=donate)

    def put(self, kind: str, *arrays) -> list:
        return list(arrays)  # host values go in as they are: jit moves them in its C++ path

    def rank_fills(self, cache: KVCache) -> list[int]:
        return [int(f) for f in np.asarray(cache.fill)]

    def row_layout(self, positions, segments, rows: int, attention: AttentionImpl) -> Layout:
        """A packed row as it is, padded at the end to a multiple of ``rows``."""
        return padded_layout(positions, segments, rows)

    def prefill_layout(
        self, lengths, starts, segments, fills, rows: int, attention: AttentionImpl
    ) -> Layout:
        positions = np.concatenate([s + np.arange(n) for n, s in zip(lengths, starts)])
        segs = np.concatenate([np.full(n, g) for n, g in zip(lengths, segments)])
        return padded_layout(positions, segs, rows)

    def check_prefill_room(self, cache: KVCache, fills, layout: Layout) -> None:
        require(
            fills[0] + layout.local_len <= cache.capacity,
            f"KV cache overflow: {fills[0]} cached + {layout.total} new tokens (padded to "
            f"{layout.local_len}) exceed the capacity of {cache.capacity}; create the cache "
            f"with a larger capacity",
        )

    def check_decode_room(self, cache: KVCache, fills, batch: int) -> None:
        require(
            fills[0] + batch <= cache.capacity,
            f"KV cache overflow: the cache is full ({fills[0]} of {cache.capacity} slots); "
            f"create it with a larger capacity",
        )

    def strategy_for(self, new_tokens: int, cached_tokens: int, config, dtype) -> str:
        """One rank has no ring; every strategy is plain attention."""
        return "pass_kv"

    def cache_window(self, cache: KVCache, fills) -> Optional[int]:
        """The whole cache: one compiled program per capacity (empty blocks are skipped)."""
        return None


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """A ``(context, tensor)`` mesh: rows and the KV cache sharded over ``context`` in the
    load-balanced layout, heads and FFN columns over ``tensor``; steps compile with
    ``jit(shard_map(...))``.

    Attributes:
      mesh: from ``cpjax.parallel.mesh.make_mesh`` (or ``distributed.global_mesh``).
      strategy: prefill ring, ``pass_kv``, ``pass_q``, ``all_gather``, or ``auto`` (the
        paper's heuristic decides per call from the new and cached token counts).
      decode_strategy: ``allreduce`` (replicated queries, one merge) or ``ring_pass_q``.
      hardware: figures for ``auto`` (``cpjax.hardware`` preset name; default ``cpu``, a
        measurement of this machine, or ``h100-nvlink`` on GPU).
    """

    mesh: Mesh
    strategy: str = "pass_kv"
    decode_strategy: str = "allreduce"
    hardware: Optional[str] = None

    prefill_chunk = None  # the mesh bounds memory: one prefill per prompt

    def __post_init__(self):
        require(
            isinstance(self.mesh, Mesh),
            f"mesh: expected a jax Mesh with axes "
            f"{CONTEXT!r} and {TENSOR!r}, got {type(self.mesh).__name__}",
        )
        check_choice("context-parallel strategy", self.strategy, PREFILL_STRATEGIES)
        check_choice("decode strategy", self.decode_strategy, DECODE_STRATEGIES)

    @property
    def n_ranks(self) -> int:
        return self.mesh.shape[CONTEXT]

    @property
    def n_tensor(self) -> int:
        return self.mesh.shape[TENSOR]

    def check_model(self, config: ModelConfig) -> None:
        """Heads, KV heads and the FFN width must split evenly over the tensor axis."""
        for name, value in (
            ("n_heads", config.n_heads),
            ("n_kv_heads", config.n_kv_heads),
            ("ffn_dim", config.ffn_dim),
        ):
            require(
                value % self.n_tensor == 0,
                f"tensor={self.n_tensor} does not divide {name}={value} of model "
                f"{config.name!r}; choose a tensor size that divides the number of heads "
                f"and KV heads",
            )

    def forward(self, config: ModelConfig, dtype, attention: AttentionImpl) -> Forward:
        return Forward(
            config, dtype, attention, Ranks(CONTEXT, self.n_ranks), tuple(self.mesh.shape.items())
        )

    # ----------------------------------------------------------------- placing arrays
    def _sharding(self, partition: P) -> NamedSharding:
        return NamedSharding(self.mesh, partition)

    def place_params(self, params, config: ModelConfig, dtype):
        """The parameters in ``dtype``, sharded by the rules table; never gathered on one
        device (a checkpoint restored onto the mesh stays where it is)."""
        return jax.tree.map(
            lambda x, s: put(x, self._sharding(s), dtype),
            params,
            tree_specs(param_axes(config), params),
        )

    def optimizer_state_shardings(self, params, config: ModelConfig):
        """Per parameter of ``params`` (placed), the sharding of optimizer-state arrays shaped
        like it (AdamW's moments): the parameter's own, with one more dimension split over the
        context ranks (ZeRO stage 1), the first one not split already whose size the ranks
        divide; the parameter's own where none is. The parameters stay replicated over
        ``context`` (every rank's forward needs them); each rank updates its slice of the
        state and the update is gathered, so a rank holds 1/N of the state, not all of it."""
        return jax.tree.map(
            lambda x, partition: self._sharding(
                split_over(partition, x.shape, CONTEXT, self.n_ranks)
            ),
            params,
            tree_specs(param_axes(config), params),
        )

    def _specs(self, kind: str, params=None, config: Optional[ModelConfig] = None):
        row = P(CONTEXT)
        if kind == "params":
            return tree_specs(param_axes(config), params)
        if kind == "cache":
            kv = spec(KV_AXES)
            return KVCache(k=kv, v=kv, pos=row, seg=row, fill=row)
        return {"rows": row, "replicated": P()}[kind]

    def new_cache(self, config: ModelConfig, capacity: int, dtype) -> KVCache:
        """A cache of ``capacity`` tokens in all, sharded over the context axis.

        Each rank gets ``ceil(capacity / N) + 1`` slots (rounded up to 64): prefills fill every
        rank equally and decode places tokens round-robin, so no rank needs more.
        """
        per_rank = round_up(-(-capacity // self.n_ranks) + 1, 64)
        shardings = jax.tree.map(self._sharding, self._specs("cache"))
        make = functools.partial(
            kv_cache.init_cache, config, per_rank * self.n_ranks, dtype, self.n_ranks
        )
        return jax.jit(make, out_shardings=shardings)()

    def compile(
        self, fn: Callable, in_kinds, out_kinds, config: ModelConfig, params, donate=()
    ) -> Callable:
        """``jit(shard_map(fn))`` with each argument's specs from its kind.

        check_vma=False: user attention kernels (loops whose carries start as constants) need
        not annotate which mesh axes their values vary over.
        """
        in_specs = tuple(self._specs(k, params, config) for k in in_kinds)
        out_specs = tuple(self._specs(k, params, config) for k in out_kinds)
        mapped = jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs[0] if len(out_specs) == 1 else out_specs,
            check_vma=False,
        )
        return jax.jit(mapped, donate_argnames=donate)

    def put(self, kind: str, *arrays) -> list:
        sharding = self._sharding(self._specs(kind))
        if sharding.is_fully_addressable and not any(isinstance(a, jax.Array) for a in arrays):
            # host values on one process: one transfer for all (less host time per step)
            return jax.device_put([np.asarray(a) for a in arrays], [sharding] * len(arrays))
        return [put(a, sharding) for a in arrays]

    def rank_fills(self, cache: KVCache) -> list[int]:
        return [int(f) for f in fetch(cache.fill)]

    # ----------------------------------------------------------------- layouts and room
    def _balanced(
        self, lengths, starts, segment_ids, rows: int, attention: AttentionImpl
    ) -> Layout:
        """Balanced layout whose chunks are padded so ``rows`` bucket the shapes and
        ``attention``'s tiles never straddle two chunks (``ring.chunk_rows_multiple``)."""
        pad = chunk_rows_multiple(attention, self.n_ranks, rows, max(lengths))
        return balanced_layout(lengths, self.n_ranks, starts, segment_ids, pad_multiple=pad)

    def row_layout(self, positions, segments, rows: int, attention: AttentionImpl) -> Layout:
        """The balanced layout of a packed row (each segment's positions consecutive)."""
        return self._balanced(*segment_runs(positions, segments), rows, attention)

    def prefill_layout(
        self, lengths, starts, segments, fills, rows: int, attention: AttentionImpl
    ) -> Layout:
        """Each new sequence balanced over the ranks on its own, the whole rotated so the
        fullest cache shard stays as small as it can (a short turn's tokens go to the ranks
        that hold the fewest)."""
        layout = self._balanced(lengths, starts, segments, rows, attention)
        real = layout.real_per_rank()
        fills = np.asarray(fills)
        best = min(
            range(layout.n_ranks),
            key=lambda shift: (int((fills + np.roll(real, shift)).max()), shift),
        )
        return layout.rotated(best)

    def check_prefill_room(self, cache: KVCache, fills, layout: Layout) -> None:
        per_rank = cache.capacity // self.n_ranks
        require(
            max(fills) + layout.local_len <= per_rank,
            f"KV cache overflow: a rank holds {max(fills)} of its {per_rank} slots and this "
            f"prefill adds {layout.local_len} per rank ({layout.total} tokens over "
            f"{self.n_ranks} ranks); create the cache with a larger capacity",
        )

    def check_decode_room(self, cache: KVCache, fills, batch: int) -> None:
        per_rank = cache.capacity // self.n_ranks
        require(
            max(fills) + -(-batch // self.n_ranks) <= per_rank,
            f"KV cache overflow: a rank has used {max(fills)} of its {per_rank} slots; "
            f"create the cache with a larger capacity",
        )

    def cache_window(self, cache: KVCache, fills) -> int:
        """Cache slots per rank a prefill attends (and pass-KV circulates): the fullest rank's
        fill rounded up to ``WINDOW_ROWS``, not the whole capacity; 0 for an empty cache.

        This is the paper's ``max_j P_j`` message; the rounding bounds recompilation to one
        program per ``WINDOW_ROWS`` of cache growth.
        """
        top = max(fills)
        return 0 if top == 0 else min(cache.capacity // self.n_ranks, round_up(top, WINDOW_ROWS))

    # ----------------------------------------------------------------- strategy
    @functools.cached_property
    def _hardware(self):
        """The figures ``auto`` decides with (measured once, on first use, for ``cpu``)."""
        name = self.hardware or ("h100-nvlink" if jax.default_backend() == "gpu" else "cpu")
        return get_hardware(name)

    def strategy_for(self, new_tokens: int, cached_tokens: int, config: ModelConfig, dtype) -> str:
        """The prefill ring for ``new_tokens`` after ``cached_tokens`` (see ``strategy``)."""
        if self.strategy != "auto":
            return self.strategy
        return choose_strategy(
            new_tokens,
            cached_tokens,
            config,
            self.n_ranks,
            self._hardware,
            bytes_per_element=jnp.dtype(dtype).itemsize,
        )
