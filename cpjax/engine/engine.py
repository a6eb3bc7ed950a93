"""Inference on one device: prefill, jitted decode step, greedy generation and scoring.

``Engine`` binds a model config, its parameters and an attention implementation, and owns the
compiled functions. Prompts are padded to a bucket of ``bucket`` tokens (padding carries
segment -1 and is invisible), so a handful of shapes compile once each; the decode step has one
shape per cache capacity and never recompiles per token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cpjax.attention import with_past
from cpjax.config import ModelConfig
from cpjax.dispatch import get_attend
from cpjax.engine import kv_cache
from cpjax.engine import sampling as sampling_lib
from cpjax.engine.kv_cache import KVCache
from cpjax.engine.sampling import GREEDY, Sampling
from cpjax.errors import CpjaxError, NonFiniteError, require
from cpjax.model.llama import Llama, PastKV, check_param_shapes, leaves_by_name

SCORE_CHUNK = 256  # tokens per chunk when turning hidden states into log-probabilities
PREFILL_CHUNK = 2048  # a long prompt is prefilled in chunks of this many tokens, with progress


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (and >= ``multiple``)."""
    return max(multiple, -(-n // multiple) * multiple)


def validate_int_array(values, length: Optional[int], name: str, *, low: int = 0,
                       high: Optional[int] = None, rule: str = "",
                       item: str = "value") -> np.ndarray:
    """``values`` as a 1-D int32 array (of ``length`` entries unless None) of integers in
    ``[low, high)``; a :class:`CpjaxError` naming ``name``, the offending ``item`` and the rule
    otherwise."""
    arr = np.asarray(values)
    if length is None:
        require(arr.ndim == 1, f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    else:
        require(arr.shape == (length,), f"{name}: expected shape ({length},), got {arr.shape}")
    require(np.issubdtype(arr.dtype, np.integer) or arr.size == 0,
            f"{name}: must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < low) | (arr >= (high if high is not None else np.inf)))
    if bad.size:
        allowed = f"is outside [{low}, {high})" if high is not None else f"is below {low}"
        raise CpjaxError(f"{name}: {item} {arr[bad[0]]} at index {bad[0]} {allowed}"
                         + (f" ({rule})" if rule else ""))
    return arr.astype(np.int32)


def validate_token_ids(ids, vocab_size: int, *, name: str = "token ids") -> np.ndarray:
    """``ids`` as a non-empty 1-D int32 array of ids in ``[0, vocab_size)``; a
    :class:`CpjaxError` naming the rule otherwise."""
    require(np.size(ids) > 0 or np.ndim(ids) != 1,
            f"{name}: empty (at least one token is needed)")
    return validate_int_array(ids, None, name, high=vocab_size, rule="the vocabulary size",
                              item="token id")


def _pad(x: np.ndarray, length: int, value: int) -> np.ndarray:
    return np.concatenate([x, np.full(length - x.size, value, np.int32)])


@dataclasses.dataclass
class Engine:
    """Single-device inference for one model.

    Attributes:
      config: the model shapes.
      params: the parameter pytree (as returned by a loader or ``init_params``).
      dtype: activation / parameter dtype (``jnp.float32`` or ``jnp.bfloat16``).
      attention: attention implementation name (see ``cpjax.attention``).
      bucket: prompt lengths are padded to a multiple of this.
    """

    config: ModelConfig
    params: dict
    dtype: object = jnp.float32
    attention: str = "auto"
    bucket: int = 64
    check_finite: bool = False

    def __post_init__(self):
        require(isinstance(self.config, ModelConfig),
                f"config: expected a ModelConfig, got {type(self.config).__name__}")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        require(dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)),
                f"dtype={getattr(dtype, 'name', self.dtype)!r}: choose float32 or bfloat16")
        require(isinstance(self.bucket, int) and self.bucket >= 1,
                f"bucket={self.bucket!r}: must be an int >= 1")
        require(isinstance(self.params, dict),
                f"params: expected the parameter dict of a loader or init_params, got "
                f"{type(self.params).__name__}")
        check_param_shapes(self.config, {name: np.shape(x) for name, x in
                                         leaves_by_name(self.params).items()})
        self.model = Llama(self.config, with_past(get_attend(self.attention)), self.dtype)
        self.params = self._place_params(self.params)
        self._prefill = jax.jit(self._prefill_impl)
        self._decode = jax.jit(self._decode_impl, donate_argnums=(5,))
        self._score = jax.jit(self._score_impl)
        self._prefill_logprobs = jax.jit(self._prefill_logprobs_impl, donate_argnums=(5,))
        self._logits = jax.jit(self._logits_impl)

    def _place_params(self, params):
        """The parameters in ``dtype`` on the default device."""
        return jax.tree.map(lambda x: jnp.asarray(x, self.dtype), params)

    # ----------------------------------------------------------------- compiled bodies
    def _trunk(self, params, tokens, positions, segments, past=None):
        return self.model.apply({"params": params}, tokens, positions, segments, past)

    def _head(self, params, hidden):
        return self.model.apply({"params": params}, hidden, method=Llama.logits)

    def _prefill_impl(self, params, tokens, positions, segments, cache: KVCache, last_rows,
                      n_real):
        """Append a packed row to ``cache``; returns (logits [B, V] at ``last_rows [B]``, cache)."""
        out = self._trunk(params, tokens, positions, segments, cache.as_past())
        cache = kv_cache.append(cache, out.k, out.v, positions, segments, n_real)
        return self._head(params, out.hidden[last_rows]), cache

    def _prefill_logprobs_impl(self, params, tokens, targets, positions, segments,
                               cache: KVCache, n_real):
        out = self._trunk(params, tokens, positions, segments, cache.as_past())
        cache = kv_cache.append(cache, out.k, out.v, positions, segments, n_real)
        return self._logprobs(params, out.hidden, targets), cache

    def _decode_impl(self, params, tokens, positions, segments, step, cache: KVCache,
                     key, temperature, top_k, top_p):
        """One token for each of ``B`` sequences: returns (logits [B, V], next [B], cache)."""
        out = self._trunk(params, tokens, positions, segments, cache.as_past())
        logits = self._head(params, out.hidden)
        cache = kv_cache.append(cache, out.k, out.v, positions, segments, tokens.shape[0])
        next_tokens = sampling_lib.sample(logits, key, step + 1, jnp.arange(tokens.shape[0]),
                                          temperature, top_k, top_p)
        return logits, next_tokens, cache

    def _logprobs(self, params, hidden, targets):
        """Log-probability of ``targets [T]`` under the logits of ``hidden [T, D]``: ``[T]``.

        Computed in chunks of ``SCORE_CHUNK`` tokens so the ``[T, V]`` logits never exist.
        """
        chunk = SCORE_CHUNK if hidden.shape[0] % SCORE_CHUNK == 0 else hidden.shape[0]

        def chunk_logprobs(args):
            h, tgt = args
            logits = self._head(params, h)
            picked = jnp.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
            return picked - jax.nn.logsumexp(logits, axis=-1)

        lp = jax.lax.map(chunk_logprobs, (hidden.reshape(-1, chunk, hidden.shape[-1]),
                                          targets.reshape(-1, chunk)))
        return lp.reshape(-1)

    def _score_impl(self, params, tokens, targets, positions, segments):
        """Log-probability of ``targets[t]`` after the row's tokens visible to ``t``: ``[T]``."""
        hidden = self._trunk(params, tokens, positions, segments).hidden
        return self._logprobs(params, hidden, targets)

    def _logits_impl(self, params, tokens, positions, segments):
        return self._head(params, self._trunk(params, tokens, positions, segments).hidden)

    # ----------------------------------------------------------------- public API
    def check_length(self, n_tokens: int, what: str = "prompt") -> None:
        """Raise unless ``n_tokens`` fits the model's context window."""
        require(n_tokens <= self.config.max_seq_len,
                f"{what} needs {n_tokens} tokens, more than the context window of "
                f"{self.config.max_seq_len} tokens of model {self.config.name!r}")

    def prefill_slots(self, n_tokens: int) -> int:
        """Cache slots a prefill of ``n_tokens`` occupies (its padded length)."""
        return round_up(n_tokens, self.bucket)

    def new_cache(self, capacity: int) -> KVCache:
        """An empty cache with room for ``capacity`` tokens."""
        self._check_capacity(capacity)
        return kv_cache.init_cache(self.config, capacity, self.dtype)

    @staticmethod
    def _check_capacity(capacity) -> None:
        require(isinstance(capacity, (int, np.integer)) and capacity >= 1,
                f"capacity={capacity!r}: a KV cache needs an integer capacity >= 1 (tokens)")

    def logits(self, ids, positions=None, segments=None) -> np.ndarray:
        """``[T, V]`` float32 logits of a packed row (positions default to 0..T-1, segment 0)."""
        ids = validate_token_ids(ids, self.config.vocab_size)
        t = ids.size
        positions = np.arange(t, dtype=np.int32) if positions is None else positions
        segments = np.zeros(t, np.int32) if segments is None else segments
        positions = self._validate_positions(positions, t)
        segments = self._validate_segments(segments, t)
        out = self._run_logits(ids, positions, segments)
        self._check_output("logits", out, ids, positions, segments)
        return out

    def _run_logits(self, ids, positions, segments) -> np.ndarray:
        return np.asarray(self._logits(self.params, ids, positions, segments))

    def _validate_positions(self, positions, length: int, name: str = "positions"):
        return validate_int_array(positions, length, name, high=self.config.max_seq_len,
                                  rule=f"the context window of model {self.config.name!r}")

    @staticmethod
    def _validate_segments(segments, length: int, name: str = "segments"):
        return validate_int_array(segments, length, name, rule="segment ids are >= 0; "
                                  "padding is added internally")

    # ----------------------------------------------------------------- check mode
    def _past_for_check(self, cache: KVCache) -> Optional[PastKV]:
        """A host copy of ``cache`` for a replay, taken before a call donates it (check mode
        only; ``None`` otherwise)."""
        if not self.check_finite:
            return None
        from cpjax.parallel.distributed import fetch
        return PastKV(*(fetch(x) for x in (cache.k, cache.v, cache.pos, cache.seg)))

    def _check_output(self, what: str, values, tokens, positions, segments,
                      past: Optional[PastKV] = None) -> None:
        """In check mode, raise :class:`NonFiniteError` naming the first layer whose output
        holds NaN/Inf if ``values`` (the output of ``what``) does."""
        if not self.check_finite or np.isfinite(np.asarray(values, np.float32)).all():
            return
        from cpjax.model.diagnostics import first_nonfinite
        from cpjax.parallel.distributed import fetch
        where = first_nonfinite(self.config, jax.tree.map(fetch, self.params), tokens,
                                positions, segments, past, self.dtype)
        raise NonFiniteError(
            f"{what}: the output holds NaN/Inf; "
            + (f"it first appears in {where}" if where else
               "a single-device replay of the same inputs stays finite (a parallel-path bug?)"))

    def score(self, ids, split_at=None) -> np.ndarray:
        """``[T-1]`` float32 log-probabilities of ``ids[1:]``, each given its prefix.

        ``split_at``: ``K`` or increasing ``[K1, K2, ...]``: prefill tokens ``[0, K1)``, then
        partial-prefill each following piece against the persistent cache (multi-turn); the
        result equals the one-shot score.
        """
        ids = validate_token_ids(ids, self.config.vocab_size)
        require(ids.size >= 2, f"score needs at least 2 tokens, got {ids.size}")
        self.check_length(ids.size)
        logprobs = self._score_pieces(ids, split_at)
        n = ids.size - 1
        self._check_output("score", logprobs, ids[:-1], np.arange(n), np.zeros(n, np.int32))
        return logprobs

    def _score_pieces(self, ids: np.ndarray, split_at) -> np.ndarray:
        if split_at is None:
            return self._score_whole(ids)
        splits = [int(k) for k in np.atleast_1d(split_at)]
        require(all(a < b for a, b in zip([0, *splits], [*splits, ids.size - 1])),
                f"split_at={splits}: split points must increase strictly within "
                f"[1, {ids.size - 2}] (the {ids.size - 1} scored tokens must be cut into "
                f"non-empty pieces)")
        bounds = [0, *splits, ids.size - 1]
        pieces = list(zip(bounds[:-1], bounds[1:]))
        cache = self.new_cache(sum(self.prefill_slots(b - a) for a, b in pieces))
        logprobs = []
        for a, b in pieces:
            lp, cache = self.prefill_logprobs(ids[a:b], ids[a + 1:b + 1], cache, a)
            logprobs.append(lp)
        return np.concatenate(logprobs)

    def _score_whole(self, ids: np.ndarray) -> np.ndarray:
        padded = round_up(ids.size - 1, max(self.bucket, SCORE_CHUNK))
        tokens = _pad(ids[:-1], padded, 0)
        targets = _pad(ids[1:], padded, 0)
        segments = _pad(np.zeros(ids.size - 1, np.int32), padded, kv_cache.EMPTY_SEGMENT)
        positions = np.arange(padded, dtype=np.int32)
        lp = self._score(self.params, tokens, targets, positions, segments)
        return np.asarray(lp[: ids.size - 1], np.float32)

    def prefill_logprobs(self, ids, targets, cache: KVCache, start_position: int = 0,
                         segment: int = 0):
        """Partial prefill of ``ids [n]`` that also scores ``targets [n]`` (the token after
        each): returns ``(log-probabilities [n] float32, cache)``."""
        ids, targets = self._validate_scored(ids, targets)
        (segment,), (start_position,) = self._turns([ids.size], [segment], [start_position])
        past = self._past_for_check(cache)
        lp, cache = self._run_prefill_logprobs(ids, targets, cache, start_position, segment)
        self._check_output("prefill_logprobs", lp, ids,
                           start_position + np.arange(ids.size), np.full(ids.size, segment),
                           past)
        return lp, cache

    def _run_prefill_logprobs(self, ids, targets, cache: KVCache, start_position: int,
                              segment: int):
        self._check_turns(cache, [segment], [start_position])
        padded = self.prefill_slots(ids.size)
        self._check_prefill_room(cache, ids.size, padded)
        positions = np.arange(start_position, start_position + padded, dtype=np.int32)
        segments = _pad(np.full(ids.size, segment, np.int32), padded, kv_cache.EMPTY_SEGMENT)
        lp, cache = self._prefill_logprobs(self.params, _pad(ids, padded, 0),
                                           _pad(targets, padded, 0), positions, segments, cache,
                                           ids.size)
        return np.asarray(lp[:ids.size], np.float32), cache

    def _validate_scored(self, ids, targets):
        """``(ids, targets)`` validated as token ids of the same shape."""
        ids = validate_token_ids(ids, self.config.vocab_size)
        targets = validate_token_ids(targets, self.config.vocab_size, name="targets")
        require(targets.shape == ids.shape, f"targets: shape {targets.shape} must equal the ids' "
                f"{ids.shape}")
        return ids, targets

    def _check_prefill_room(self, cache: KVCache, n_new: int, padded: int) -> None:
        fill = int(cache.fill)
        require(fill + padded <= cache.capacity,
                f"KV cache overflow: {fill} cached + {n_new} new tokens (padded to {padded}) "
                f"exceed the capacity of {cache.capacity}; create the cache with a larger "
                f"capacity")

    def next_position(self, cache: KVCache, segment: int = 0) -> int:
        """Position after the last cached token of ``segment`` (0 if it has none)."""
        return int(_next_position(cache.pos, cache.seg, segment))

    def _check_turns(self, cache, segments, start_positions) -> None:
        """Each sequence must continue its segment in the cache exactly where it left off."""
        for seg, start in zip(segments, start_positions):
            expected = self.next_position(cache, seg)
            require(start == expected,
                    f"turn of segment {seg} starts at position {start}, but the cache holds "
                    f"that segment up to position {expected - 1} (the next turn must start at "
                    f"{expected}); pass the right segment id or start position")

    def _pack(self, sequences, segments, start_positions):
        """Validated ``(ids list, segments, starts)`` of a batch of prefills."""
        require(isinstance(sequences, (list, tuple)) and len(sequences) > 0,
                "sequences: expected a non-empty list of token id arrays")
        ids = [validate_token_ids(x, self.config.vocab_size, name=f"sequence {i} token ids")
               for i, x in enumerate(sequences)]
        return (ids, *self._turns([x.size for x in ids], segments, start_positions))

    def _turns(self, lengths, segments, start_positions):
        """Validated ``(segments, starts)`` (lists of ints) for new sequences of ``lengths``:
        one distinct segment id >= 0 and one start position >= 0 each (defaults: ``0..B-1``
        and 0), and room for each in the context window."""
        n = len(lengths)
        segments = validate_int_array(range(n) if segments is None else list(segments), n,
                                      "segments", rule="segment ids are >= 0").tolist()
        require(len(set(segments)) == n,
                f"segments={segments}: need one distinct id >= 0 per sequence ({n})")
        starts = validate_int_array([0] * n if start_positions is None else
                                    list(start_positions), n, "start_positions").tolist()
        for length, start in zip(lengths, starts):
            self.check_length(start + length, "cached plus new tokens")
        return segments, starts

    def prefill_batch(self, sequences, cache: KVCache, segments=None, start_positions=None):
        """(Partial) prefill of several sequences packed into one row of the cache.

        Args:
          sequences: ``B`` token id arrays.
          segments: their sequence ids in the cache (default ``0..B-1``).
          start_positions: position of each one's first new token (default 0); must continue
            what the cache holds for that segment.
        Returns ``(logits [B, V] of each sequence's last token, cache)``.
        """
        ids, segments, starts = self._pack(sequences, segments, start_positions)
        past = self._past_for_check(cache)
        logits, cache = self._run_prefill_batch(ids, segments, starts, cache)
        if self.check_finite:   # replay every new token against the cache as it was
            self._check_output(
                "prefill", logits, np.concatenate(ids),
                np.concatenate([p + np.arange(x.size) for x, p in zip(ids, starts)]),
                np.concatenate([np.full(x.size, g) for x, g in zip(ids, segments)]), past)
        return logits, cache

    def _run_prefill_batch(self, ids, segments, starts, cache: KVCache):
        self._check_turns(cache, segments, starts)
        n = sum(x.size for x in ids)
        padded = self.prefill_slots(n)
        self._check_prefill_room(cache, n, padded)
        tokens = _pad(np.concatenate(ids), padded, 0)
        positions = _pad(np.concatenate([p + np.arange(x.size) for x, p in zip(ids, starts)])
                         .astype(np.int32), padded, 0)
        segs = _pad(np.concatenate([np.full(x.size, s, np.int32) for x, s in zip(ids, segments)]),
                    padded, kv_cache.EMPTY_SEGMENT)
        last_rows = np.cumsum([x.size for x in ids]).astype(np.int32) - 1
        return self._prefill(self.params, tokens, positions, segs, cache, last_rows, n)

    def prefill(self, ids, cache: KVCache, start_position: int = 0, segment: int = 0):
        """Append ``ids`` of ``segment`` (positions from ``start_position``) to ``cache``.

        Returns ``(logits [V] of the last token, cache)``.
        """
        logits, cache = self.prefill_batch([ids], cache, [segment], [start_position])
        return logits[0], cache

    def _check_decode_room(self, cache: KVCache, batch: int) -> None:
        fill = int(cache.fill)
        require(fill + batch <= cache.capacity,
                f"KV cache overflow: the cache is full ({fill} of {cache.capacity} slots); "
                f"create it with a larger capacity")

    def decode(self, tokens, positions, segments, step: int, cache: KVCache,
               sampling: Sampling = GREEDY):
        """One decode step for ``B`` sequences.

        Args:
          tokens, positions, segments: ``[B]`` int32: the last token of each sequence, its
            position and its segment id in the cache.
          step: decode step counter (the sampler's key and, with context parallelism, the rank
            that stores each new K/V depend on it); one compiled step serves all steps.
        Returns ``(logits [B, V], next tokens [B] int32, cache)``.
        """
        tokens = validate_token_ids(np.asarray(tokens).reshape(-1), self.config.vocab_size,
                                    name="decode tokens")
        positions = self._validate_positions(np.asarray(positions).reshape(-1), tokens.size,
                                             "decode positions")
        segments = self._validate_segments(np.asarray(segments).reshape(-1), tokens.size,
                                           "decode segments")
        require(isinstance(step, (int, np.integer)) and step >= 0,
                f"step={step!r}: must be an integer >= 0")
        require(isinstance(sampling, Sampling),
                f"sampling: expected a Sampling, got {type(sampling).__name__}")
        self._check_decode_room(cache, tokens.size)
        past = self._past_for_check(cache)
        logits, next_tokens, cache = self._run_decode(tokens, positions, segments, step, cache,
                                                      sampling)
        self._check_output("decode", logits, tokens, positions, segments, past)
        return logits, next_tokens, cache

    def _run_decode(self, tokens, positions, segments, step: int, cache: KVCache,
                    sampling: Sampling):
        return self._decode(self.params, tokens, positions, segments, np.int32(step), cache,
                            *sampling.as_arrays())

    def first_tokens(self, logits, sampling: Sampling = GREEDY, turn: int = 0) -> np.ndarray:
        """Tokens ``[B]`` drawn from the prefill logits ``[B, V]`` of turn ``turn``."""
        return np.asarray(_sample_first(jnp.asarray(logits),
                                        np.int32(sampling_lib.FIRST_TOKEN_KEYS + turn),
                                        *sampling.as_arrays()))

    def prefill_prompt(self, ids, cache: KVCache, start_position: int = 0, segment: int = 0):
        """Prefill a prompt (or a follow-up turn at ``start_position``); long ones go in chunks
        of ``PREFILL_CHUNK`` tokens with a progress bar.

        Each chunk is a partial prefill against the cache filled by the previous ones (exact:
        masks come from positions), so memory stays bounded by the chunk size.
        Returns ``(logits [V] of the last token, cache)``.
        """
        offsets = range(0, len(ids), PREFILL_CHUNK)
        for offset in tqdm(offsets, desc="prefill", unit="chunk", disable=len(offsets) == 1,
                           leave=False):
            logits, cache = self.prefill(ids[offset:offset + PREFILL_CHUNK], cache,
                                         start_position=start_position + offset,
                                         segment=segment)
        return logits, cache

    def generate_batch(self, prompts, max_new_tokens: int, stop_ids: Iterable[int] = (),
                       sampling: Sampling = GREEDY) -> list[list[int]]:
        """Generate for ``B`` prompts at once (packed prefill, batched decode).

        Returns each sequence's new tokens, ending at (and including) its first stop id.
        """
        require(isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0,
                f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
        ids, segments, _ = self._pack(prompts, None, None)
        for x in ids:
            self.check_length(x.size + max_new_tokens, "prompt plus max_new_tokens")
        if max_new_tokens == 0:
            return [[] for _ in ids]
        stop = set(int(s) for s in stop_ids)
        capacity = self.capacity_for(sum(x.size for x in ids), len(ids) * max_new_tokens,
                                     len(ids))
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

    def capacity_for(self, prompt_tokens: int, new_tokens: int, batch: int = 1) -> int:
        """A cache capacity that holds a prefill of ``prompt_tokens`` and ``new_tokens`` more."""
        return round_up(self.prefill_slots(prompt_tokens) + new_tokens + batch, 256)

    def generate_stream(self, prompt_ids, max_new_tokens: int, stop_ids: Iterable[int] = (),
                        sampling: Sampling = GREEDY) -> Iterator[int]:
        """Yield new token ids one by one (greedy by default), stopping after a stop id."""
        from cpjax.engine.session import Session

        ids = validate_token_ids(prompt_ids, self.config.vocab_size, name="prompt token ids")
        require(isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0,
                f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
        self.check_length(ids.size + max_new_tokens, "prompt plus max_new_tokens")
        session = Session(self, self.capacity_for(ids.size, max_new_tokens))
        yield from session.turn(ids, max_new_tokens, stop_ids, sampling)

    def generate(self, prompt_ids, max_new_tokens: int, stop_ids: Iterable[int] = (),
                 on_token: Optional[Callable[[int], None]] = None,
                 sampling: Sampling = GREEDY) -> list[int]:
        """Generate (greedy by default); returns the new token ids (including a final stop id)."""
        out = []
        for token in self.generate_stream(prompt_ids, max_new_tokens, stop_ids, sampling):
            out.append(token)
            if on_token is not None:
                on_token(token)
        return out


@jax.jit
def _next_position(pos, seg, segment):
    return jnp.max(jnp.where(seg == segment, pos, -1)) + 1


@jax.jit
def _sample_first(logits, key_index, key, temperature, top_k, top_p):
    return sampling_lib.sample(logits, key, key_index, jnp.arange(logits.shape[0]), temperature,
                               top_k, top_p)
