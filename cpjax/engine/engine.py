"""The inference engine: prefill, partial prefill, decode, generate and score, over a placement.

``Engine(config, params, placement)`` binds a model, its parameters and where they live
(``SingleDevice()`` or ``ContextParallel(mesh, ...)``, ``cpjax.engine.placement``). Its public
methods validate their inputs once (``cpjax.engine.validation``), lay the token rows out with
the placement, and run compiled step bodies (``cpjax.engine.steps``), one program per
(step, ring, cache window) and input shape. Prompts are padded to a bucket of ``bucket`` rows
(padding carries ``PAD_SEGMENT`` and is invisible), so a handful of shapes compile once each;
the decode step has one shape per cache capacity and batch and never recompiles per token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cpjax.config import ModelConfig
from cpjax.dispatch import get_attention
from cpjax.engine import sampling as sampling_lib
from cpjax.engine import steps
from cpjax.engine import validation as check
from cpjax.engine.kv_cache import KVCache
from cpjax.engine.placement import ContextParallel, SingleDevice, round_up
from cpjax.engine.sampling import GREEDY, Sampling
from cpjax.engine.session import Session
from cpjax.errors import NonFiniteError, require
from cpjax.model.decoder import Decoder, PastKV, check_param_shapes, leaves_by_name
from cpjax.names import ATTENTION_IMPLEMENTATIONS, check_choice
from cpjax.parallel.decode import fills_after_decode
from cpjax.parallel.distributed import fetch

Placement = Union[SingleDevice, ContextParallel]

# Argument kinds of each compiled step (see ``cpjax.engine.placement``).
_ROW_STEPS = {
    # name: (body, row arguments, outputs, donated)
    "prefill": (steps.prefill, 3, ("rows", "cache"), ("cache",)),
    "prefill_logprobs": (steps.prefill_logprobs, 4, ("rows", "cache"), ("cache",)),
    "score": (steps.score, 4, ("rows",), ()),
    "logits": (steps.logits, 3, ("rows",), ()),
}
_DECODE_IN = ("params", *["replicated"] * 4, "cache", *["replicated"] * 4)
_DECODE_OUT = ("replicated", "replicated", "cache")


@dataclasses.dataclass
class Engine:
    """Inference for one model on one placement.

    Attributes:
      config: the model shapes.
      params: the parameter pytree (as returned by a loader or ``init_params``).
      placement: ``SingleDevice()`` (default) or ``ContextParallel(mesh, strategy, ...)``.
      dtype: activation / parameter dtype (``jnp.float32`` or ``jnp.bfloat16``).
      attention: attention implementation name (``cpjax.names.ATTENTION_IMPLEMENTATIONS``).
      bucket: prompt lengths are padded to a multiple of this many rows.
      check_finite: check every output for NaN/Inf and name the layer where it first appears.
    """

    config: ModelConfig
    params: dict = dataclasses.field(repr=False)
    placement: Placement = dataclasses.field(default_factory=SingleDevice)
    dtype: Any = jnp.float32
    attention: str = "auto"
    bucket: int = 64
    check_finite: bool = False

    def __post_init__(self):
        check.model_and_placement(self.config, self.placement)
        self._decoded_fills = None  # (cache.fill, its sorted values) of the last decode's output
        self.dtype = check.dtype(self.dtype)
        require(
            isinstance(self.bucket, int) and self.bucket >= 1,
            f"bucket={self.bucket!r}: must be an int >= 1",
        )
        check_choice("attention implementation", self.attention, ATTENTION_IMPLEMENTATIONS)
        require(
            isinstance(self.params, dict),
            f"params: expected the parameter dict of a loader or init_params, got "
            f"{type(self.params).__name__}",
        )
        check_param_shapes(
            self.config, {name: np.shape(x) for name, x in leaves_by_name(self.params).items()}
        )
        self.forward = self.placement.forward(
            self.config, self.dtype, get_attention(self.attention)
        )
        self.params = self.placement.place_params(self.params, self.config, self.dtype)
        self._programs: dict = {}
        self._head = jax.jit(functools.partial(steps.head, Decoder(self.config, None, self.dtype)))

    # ----------------------------------------------------------------- compiled steps
    def _program(
        self, name: str, strategy: Optional[str] = None, window: Optional[int] = None
    ) -> Callable:
        """The compiled step ``name`` (for a prefill ring and cache window), built once."""
        key = (name, strategy, window)
        if key not in self._programs:
            if name == "decode":
                body = functools.partial(
                    steps.DECODE_BODIES[self.placement.decode_strategy], self.forward
                )
                self._programs[key] = self.placement.compile(
                    body, _DECODE_IN, _DECODE_OUT, self.config, self.params, donate=("cache",)
                )
            else:
                body, n_rows, outs, donate = _ROW_STEPS[name]
                bound = (
                    functools.partial(body, self.forward, strategy, window)
                    if "cache" in outs
                    else functools.partial(body, self.forward, strategy)
                )
                ins = ("params", *["rows"] * n_rows, *(("cache",) if "cache" in outs else ()))
                self._programs[key] = self.placement.compile(
                    bound, ins, outs, self.config, self.params, donate=donate
                )
        return self._programs[key]

    def _rows(self, layout, *values) -> list:
        """``values [total]`` and the layout's positions and segments, placed as rows."""
        return self.placement.put(
            "rows", *(layout.shard(v) for v in values), layout.positions, layout.segments
        )

    # ----------------------------------------------------------------- public API
    def check_length(self, n_tokens: int, what: str = "prompt") -> None:
        """Raise unless ``n_tokens`` fits the model's context window."""
        check.fits_window(self.config, n_tokens, what)

    def strategy_for(self, new_tokens: int, cached_tokens: int) -> str:
        """The prefill ring the placement uses for ``new_tokens`` after ``cached_tokens``."""
        return self.placement.strategy_for(new_tokens, cached_tokens, self.config, self.dtype)

    def prefill_slots(self, n_tokens: int) -> int:
        """Cache slots (over all ranks) a prefill of ``n_tokens`` occupies (its padded length)."""
        return self.placement.prefill_layout(
            [n_tokens], [0], [0], [0] * self.placement.n_ranks, self.bucket, self.forward.attention
        ).source.size

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache with room for ``capacity`` tokens (sharded like the placement)."""
        return self.placement.new_cache(self.config, check.capacity(capacity), self.dtype)

    def rank_fill(self, cache: KVCache) -> list[int]:
        """Slots used on each rank (one entry on a single device)."""
        return self.placement.rank_fills(cache)

    def next_position(self, cache: KVCache, segment: int = 0) -> int:
        """Position after the last cached token of ``segment`` (0 if it has none)."""
        return int(_next_position(cache.pos, cache.seg, segment))

    def capacity_for(self, prompt_tokens: int, new_tokens: int, batch: int = 1) -> int:
        """A cache capacity that holds a prefill of ``prompt_tokens`` and ``new_tokens`` more."""
        return round_up(self.prefill_slots(prompt_tokens) + new_tokens + batch, 256)

    def logits(self, ids, positions=None, segments=None) -> np.ndarray:
        """``[T, V]`` float32 logits of a packed row (positions default to 0..T-1, segment 0)."""
        ids = check.token_ids(ids, self.config.vocab_size)
        t = ids.size
        positions = check.positions(
            np.arange(t) if positions is None else positions, t, self.config
        )
        segments = check.segments(np.zeros(t, np.int32) if segments is None else segments, t)
        layout = self.placement.row_layout(positions, segments, self.bucket, self.forward.attention)
        program = self._program("logits", self.strategy_for(t, 0))
        out = layout.unshard(fetch(program(self.params, *self._rows(layout, ids))))
        self._check_output("logits", out, ids, positions, segments)
        return out

    def score(self, ids, split_at=None) -> np.ndarray:
        """``[T-1]`` float32 log-probabilities of ``ids[1:]``, each given its prefix.

        ``split_at``: ``K`` or increasing ``[K1, K2, ...]``: prefill tokens ``[0, K1)``, then
        partial-prefill each following piece against the persistent cache (multi-turn); the
        result equals the one-shot score.
        """
        ids = check.token_ids(ids, self.config.vocab_size)
        require(ids.size >= 2, f"score needs at least 2 tokens, got {ids.size}")
        self.check_length(ids.size)
        n = ids.size - 1
        if split_at is None:
            logprobs = self._score_whole(ids)
        else:
            logprobs = self._score_pieces(ids, check.split_points(split_at, n))
        self._check_output("score", logprobs, ids[:-1], np.arange(n), np.zeros(n, np.int32))
        return logprobs

    def _score_whole(self, ids: np.ndarray) -> np.ndarray:
        n = ids.size - 1
        layout = self.placement.row_layout(
            np.arange(n),
            np.zeros(n, np.int32),
            max(self.bucket, steps.SCORE_CHUNK),
            self.forward.attention,
        )
        program = self._program("score", self.strategy_for(n, 0))
        lp = program(self.params, *self._rows(layout, ids[:-1], ids[1:]))
        return layout.unshard(fetch(lp).astype(np.float32))

    def _score_pieces(self, ids: np.ndarray, splits: list[int]) -> np.ndarray:
        bounds = [0, *splits, ids.size - 1]
        pieces = list(zip(bounds[:-1], bounds[1:]))
        cache = self.new_cache(sum(self.prefill_slots(b - a) for a, b in pieces))
        logprobs = []
        for a, b in pieces:
            lp, cache = self.prefill_logprobs(ids[a:b], ids[a + 1 : b + 1], cache, a)
            logprobs.append(lp)
        return np.concatenate(logprobs)

    def _plan_prefill(self, name: str, lengths, starts, segments, cache: KVCache):
        """``(layout, compiled program)`` of a (partial) prefill of sequences of ``lengths``:
        checks that each continues its segment and that the cache has room, lays the rows out
        (on the emptiest shards) and picks the ring and the cache window."""
        check.continues_cache({s: self.next_position(cache, s) for s in segments}, segments, starts)
        fills = self.rank_fill(cache)
        layout = self.placement.prefill_layout(
            lengths, starts, segments, fills, self.bucket, self.forward.attention
        )
        self.placement.check_prefill_room(cache, fills, layout)
        strategy = self.strategy_for(sum(lengths), sum(fills))
        return layout, self._program(name, strategy, self.placement.cache_window(cache, fills))

    def prefill_logprobs(
        self, ids, targets, cache: KVCache, start_position: int = 0, segment: int = 0
    ):
        """Partial prefill of ``ids [n]`` that also scores ``targets [n]`` (the token after
        each): returns ``(log-probabilities [n] float32, cache)``."""
        ids, targets = check.scored(ids, targets, self.config.vocab_size)
        (segment,), (start_position,) = check.turns(
            self.config, [ids.size], [segment], [start_position]
        )
        past = self._past_for_check(cache)
        layout, program = self._plan_prefill(
            "prefill_logprobs", [ids.size], [start_position], [segment], cache
        )
        lp, cache = program(self.params, *self._rows(layout, ids, targets), cache)
        lp = layout.unshard(fetch(lp).astype(np.float32))
        self._check_output(
            "prefill_logprobs",
            lp,
            ids,
            start_position + np.arange(ids.size),
            np.full(ids.size, segment),
            past,
        )
        return lp, cache

    def prefill_batch(self, sequences, cache: KVCache, segments=None, start_positions=None):
        """(Partial) prefill of several sequences packed into one row of the cache.

        Each sequence's new tokens are load-balanced over the ranks on their own (paper
        Fig. 2), wherever earlier turns put the cached ones, and stay where they land.

        Args:
          sequences: ``B`` token id arrays.
          segments: their sequence ids in the cache (default ``0..B-1``).
          start_positions: position of each one's first new token (default 0); must continue
            what the cache holds for that segment.
        Returns ``(logits [B, V] of each sequence's last token, cache)``.
        """
        ids, segments, starts = check.sequences(self.config, sequences, segments, start_positions)
        past = self._past_for_check(cache)
        lengths = [x.size for x in ids]
        layout, program = self._plan_prefill("prefill", lengths, starts, segments, cache)
        hidden, cache = program(self.params, *self._rows(layout, np.concatenate(ids)), cache)
        last = np.cumsum(lengths) - 1
        slots = np.array([np.flatnonzero(layout.source == i)[0] for i in last])
        logits = self._head(self.params, fetch(hidden[slots]))
        if self.check_finite:  # replay every new token against the cache as it was
            self._check_output(
                "prefill",
                logits,
                np.concatenate(ids),
                np.concatenate([p + np.arange(x.size) for x, p in zip(ids, starts)]),
                np.concatenate([np.full(x.size, g) for x, g in zip(ids, segments)]),
                past,
            )
        return logits, cache

    def prefill(self, ids, cache: KVCache, start_position: int = 0, segment: int = 0):
        """Append ``ids`` of ``segment`` (positions from ``start_position``) to ``cache``.

        Returns ``(logits [V] of the last token, cache)``.
        """
        logits, cache = self.prefill_batch([ids], cache, [segment], [start_position])
        return logits[0], cache

    def prefill_prompt(self, ids, cache: KVCache, start_position: int = 0, segment: int = 0):
        """Prefill a prompt (or a follow-up turn at ``start_position``).

        With a placement that sets ``prefill_chunk`` (one device), a long prompt goes in chunks
        of that many tokens with a progress bar, each a partial prefill against the cache the
        previous ones filled (exact: masks come from positions), so memory stays bounded.
        Returns ``(logits [V] of the last token, cache)``.
        """
        chunk = self.placement.prefill_chunk or max(len(ids), 1)
        offsets = range(0, len(ids), chunk)
        for offset in tqdm(
            offsets, desc="prefill", unit="chunk", disable=len(offsets) == 1, leave=False
        ):
            logits, cache = self.prefill(
                ids[offset : offset + chunk],
                cache,
                start_position=start_position + offset,
                segment=segment,
            )
        return logits, cache

    def decode(
        self, tokens, positions, segments, step: int, cache: KVCache, sampling: Sampling = GREEDY
    ):
        """One decode step for ``B`` sequences.

        Args:
          tokens, positions, segments: ``[B]`` int32: the last token of each sequence, its
            position and its segment id in the cache.
          step: decode step counter (the sampler's key and, with context parallelism, the rank
            that stores each new K/V depend on it); one compiled step serves all steps.
        Returns ``(logits [B, V], next tokens [B] int32, cache)``.
        """
        tokens = check.token_ids(
            np.asarray(tokens).reshape(-1), self.config.vocab_size, name="decode tokens"
        )
        positions = check.positions(
            np.asarray(positions).reshape(-1), tokens.size, self.config, "decode positions"
        )
        segments = check.segments(np.asarray(segments).reshape(-1), tokens.size, "decode segments")
        step = check.count(step, "step")
        require(
            isinstance(sampling, Sampling),
            f"sampling: expected a Sampling, got {type(sampling).__name__}",
        )
        fills = self._fills_before_decode(cache)
        self.placement.check_decode_room(cache, fills, tokens.size)
        past = self._past_for_check(cache)
        args = self.placement.put(
            "replicated", tokens, positions, segments, np.int32(step), *sampling.as_arrays()
        )
        logits, next_tokens, cache = self._program("decode")(
            self.params, *args[:4], cache, *args[4:]
        )
        self._check_output("decode", logits, tokens, positions, segments, past)
        self._decoded_fills = (cache.fill, fills_after_decode(fills, tokens.size))
        return logits, next_tokens, cache

    def _fills_before_decode(self, cache: KVCache) -> list[int]:
        """The rank fills of ``cache`` (sorted): known on the host when ``cache`` came out of
        this engine's last decode step, fetched from the devices otherwise."""
        known = self._decoded_fills
        if known is not None and known[0] is cache.fill:
            return known[1]
        return sorted(self.rank_fill(cache))

    def first_tokens(self, logits, sampling: Sampling = GREEDY, turn: int = 0) -> np.ndarray:
        """Tokens ``[B]`` drawn from the prefill logits ``[B, V]`` of turn ``turn``."""
        return np.asarray(
            _sample_first(
                jnp.asarray(logits),
                np.int32(sampling_lib.FIRST_TOKEN_KEYS + turn),
                *sampling.as_arrays(),
            )
        )

    def generate_batch(
        self,
        prompts,
        max_new_tokens: int,
        stop_ids: Iterable[int] = (),
        sampling: Sampling = GREEDY,
    ) -> list[list[int]]:
        """Generate for ``B`` prompts at once (packed prefill, batched decode).

        Returns each sequence's new tokens, ending at (and including) its first stop id.
        """
        max_new_tokens = check.count(max_new_tokens, "max_new_tokens")
        ids, segments, _ = check.sequences(self.config, prompts)
        for x in ids:
            self.check_length(x.size + max_new_tokens, "prompt plus max_new_tokens")
        if max_new_tokens == 0:
            return [[] for _ in ids]
        stop = set(int(s) for s in stop_ids)
        capacity = self.capacity_for(sum(x.size for x in ids), len(ids) * max_new_tokens, len(ids))
        logits, cache = self.prefill_batch(ids, self.new_cache(capacity), segments)
        tokens = self.first_tokens(logits, sampling)
        positions = np.array([x.size for x in ids], np.int32)
        outputs = [[int(t)] for t in tokens]
        done = np.array([t in stop for t in tokens])
        for step in range(max_new_tokens - 1):
            if done.all():
                break
            _, tokens, cache = self.decode(tokens, positions, segments, step, cache, sampling)
            tokens = np.asarray(tokens)
            positions = positions + 1
            for b, t in enumerate(tokens):
                if not done[b]:
                    outputs[b].append(int(t))
                    done[b] = int(t) in stop
        return outputs

    def generate_stream(
        self,
        prompt_ids,
        max_new_tokens: int,
        stop_ids: Iterable[int] = (),
        sampling: Sampling = GREEDY,
    ) -> Iterator[int]:
        """Yield new token ids one by one (greedy by default), stopping after a stop id."""
        ids = check.token_ids(prompt_ids, self.config.vocab_size, name="prompt token ids")
        max_new_tokens = check.count(max_new_tokens, "max_new_tokens")
        self.check_length(ids.size + max_new_tokens, "prompt plus max_new_tokens")
        session = Session(self, self.capacity_for(ids.size, max_new_tokens))
        yield from session.turn(ids, max_new_tokens, stop_ids, sampling)

    def generate(
        self,
        prompt_ids,
        max_new_tokens: int,
        stop_ids: Iterable[int] = (),
        on_token: Optional[Callable[[int], None]] = None,
        sampling: Sampling = GREEDY,
    ) -> list[int]:
        """Generate (greedy by default); returns the new token ids (including a final stop id)."""
        out = []
        for token in self.generate_stream(prompt_ids, max_new_tokens, stop_ids, sampling):
            out.append(token)
            if on_token is not None:
                on_token(token)
        return out

    # ----------------------------------------------------------------- check mode
    def _past_for_check(self, cache: KVCache) -> Optional[PastKV]:
        """A host copy of ``cache`` for a replay, taken before a call donates it (check mode
        only; ``None`` otherwise)."""
        if not self.check_finite:
            return None
        return PastKV(*(fetch(x) for x in (cache.k, cache.v, cache.pos, cache.seg)))

    def _check_output(
        self, what: str, values, tokens, positions, segments, past: Optional[PastKV] = None
    ) -> None:
        """In check mode, raise :class:`NonFiniteError` naming the first layer whose output
        holds NaN/Inf if ``values`` (the output of ``what``) does."""
        if not self.check_finite or np.isfinite(np.asarray(values, np.float32)).all():
            return
        from cpjax.model.diagnostics import first_nonfinite

        where = first_nonfinite(
            self.config,
            jax.tree.map(fetch, self.params),
            tokens,
            positions,
            segments,
            past,
            self.dtype,
        )
        raise NonFiniteError(
            f"{what}: the output holds NaN/Inf; "
            + (
                f"it first appears in {where}"
                if where
                else "a single-device replay of the same inputs stays finite (a parallel-path bug?)"
            )
        )


@jax.jit
def _next_position(pos, seg, segment):
    return jnp.max(jnp.where(seg == segment, pos, -1)) + 1


@jax.jit
def _sample_first(logits, key_index, key, temperature, top_k, top_p):
    return sampling_lib.sample(
        logits, key, key_index, jnp.arange(logits.shape[0]), temperature, top_k, top_p
    )
