"""Inference on one device: prefill, jitted decode step, greedy generation and scoring.

``Engine`` binds a model config, its parameters and an attention implementation, and owns the
compiled functions. Prompts are padded to a bucket of ``bucket`` tokens (padding carries
segment -1 and is invisible), so a handful of shapes compile once each; the decode step has one
shape per cache capacity and never recompiles per token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cpjax.attention import get_attend, with_past
from cpjax.config import ModelConfig
from cpjax.engine import kv_cache
from cpjax.engine.kv_cache import KVCache
from cpjax.errors import CpjaxError, require
from cpjax.model.llama import Llama

SCORE_CHUNK = 256  # tokens per chunk when turning hidden states into log-probabilities
PREFILL_CHUNK = 2048  # a long prompt is prefilled in chunks of this many tokens, with progress


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (and >= ``multiple``)."""
    return max(multiple, -(-n // multiple) * multiple)


def validate_token_ids(ids, vocab_size: int, *, name: str = "token ids") -> np.ndarray:
    """``ids`` as a 1-D int32 array; a :class:`CpjaxError` naming the rule otherwise."""
    arr = np.asarray(ids)
    require(arr.ndim == 1, f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    require(arr.size > 0, f"{name}: empty (at least one token is needed)")
    require(np.issubdtype(arr.dtype, np.integer),
            f"{name}: must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    require(bad.size == 0,
            f"{name}: token id {arr[bad[0]] if bad.size else 0} at index "
            f"{bad[0] if bad.size else 0} is outside [0, {vocab_size}) (the vocabulary size)")
    return arr.astype(np.int32)


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

    def __post_init__(self):
        self.model = Llama(self.config, with_past(get_attend(self.attention)), self.dtype)
        self.params = jax.tree.map(lambda x: jnp.asarray(x, self.dtype), self.params)
        self._prefill = jax.jit(self._prefill_impl)
        self._decode = jax.jit(self._decode_impl, donate_argnums=(3,))
        self._score = jax.jit(self._score_impl)
        self._logits = jax.jit(self._logits_impl)

    # ----------------------------------------------------------------- compiled bodies
    def _trunk(self, params, tokens, positions, segments, past=None):
        return self.model.apply({"params": params}, tokens, positions, segments, past)

    def _head(self, params, hidden):
        return self.model.apply({"params": params}, hidden, method=Llama.logits)

    def _prefill_impl(self, params, tokens, positions, segments, cache: KVCache, n_real):
        """Append ``tokens`` to ``cache``; returns (logits of the last real token [V], cache)."""
        out = self._trunk(params, tokens, positions, segments, cache.as_past())
        last = jax.lax.dynamic_index_in_dim(out.hidden, n_real - 1, keepdims=False)
        cache = kv_cache.append(cache, out.k, out.v, positions, segments, n_real)
        return self._head(params, last), cache

    def _decode_impl(self, params, token, position, cache: KVCache):
        """One token: returns (logits [V], greedy next token [], cache)."""
        tokens, positions = token[None], position[None]
        segments = jnp.zeros((1,), jnp.int32)
        out = self._trunk(params, tokens, positions, segments, cache.as_past())
        logits = self._head(params, out.hidden[0])
        cache = kv_cache.append(cache, out.k, out.v, positions, segments, 1)
        return logits, jnp.argmax(logits).astype(jnp.int32), cache

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
        return kv_cache.init_cache(self.config, capacity, self.dtype)

    def logits(self, ids, positions=None, segments=None) -> np.ndarray:
        """``[T, V]`` float32 logits of a packed row (positions default to 0..T-1, segment 0)."""
        ids = validate_token_ids(ids, self.config.vocab_size)
        t = ids.size
        positions = np.arange(t, dtype=np.int32) if positions is None else np.asarray(positions)
        segments = np.zeros(t, np.int32) if segments is None else np.asarray(segments)
        require(positions.shape == (t,) and segments.shape == (t,),
                f"positions/segments must have shape ({t},) like the ids, got "
                f"{positions.shape} and {segments.shape}")
        return np.asarray(self._logits(self.params, ids, positions.astype(np.int32),
                                       segments.astype(np.int32)))

    def score(self, ids) -> np.ndarray:
        """``[T-1]`` float32 log-probabilities of ``ids[1:]``, each given its prefix."""
        ids = validate_token_ids(ids, self.config.vocab_size)
        require(ids.size >= 2, f"score needs at least 2 tokens, got {ids.size}")
        self.check_length(ids.size)
        padded = round_up(ids.size - 1, max(self.bucket, SCORE_CHUNK))
        tokens = _pad(ids[:-1], padded, 0)
        targets = _pad(ids[1:], padded, 0)
        segments = _pad(np.zeros(ids.size - 1, np.int32), padded, kv_cache.EMPTY_SEGMENT)
        positions = np.arange(padded, dtype=np.int32)
        lp = self._score(self.params, tokens, targets, positions, segments)
        return np.asarray(lp[: ids.size - 1], np.float32)

    def prefill(self, ids, cache: KVCache, start_position: int = 0):
        """Append ``ids`` (positions from ``start_position``) to ``cache``.

        Returns ``(logits [V] of the last token, cache)``.
        """
        ids = validate_token_ids(ids, self.config.vocab_size)
        padded = self.prefill_slots(ids.size)
        fill = int(cache.fill)
        require(fill + padded <= cache.capacity,
                f"KV cache overflow: {fill} cached + {ids.size} new tokens (padded to "
                f"{padded}) exceed the capacity of {cache.capacity}; create the cache with a "
                f"larger capacity")
        tokens = _pad(ids, padded, 0)
        positions = np.arange(start_position, start_position + padded, dtype=np.int32)
        segments = _pad(np.zeros(ids.size, np.int32), padded, kv_cache.EMPTY_SEGMENT)
        return self._prefill(self.params, tokens, positions, segments, cache, ids.size)

    def decode_step(self, token, position: int, step: int, cache: KVCache):
        """Feed one token at ``position``; returns (greedy next token [] int32, cache).

        ``step`` counts decode steps (context-parallel engines place each new token's K/V on
        rank ``step mod N``); the compiled step is shared by all steps.
        """
        _, next_token, cache = self._decode(self.params, jnp.asarray(token, jnp.int32),
                                            jnp.int32(position), cache)
        return next_token, cache

    def prefill_prompt(self, ids, cache: KVCache):
        """Prefill a whole prompt from position 0; long prompts go in chunks with a progress bar.

        Each chunk is a prefill against the cache filled by the previous ones (exact: masks come
        from positions), so memory stays bounded by the chunk size.
        """
        starts = range(0, len(ids), PREFILL_CHUNK)
        for start in tqdm(starts, desc="prefill", unit="chunk", disable=len(starts) == 1,
                          leave=False):
            logits, cache = self.prefill(ids[start:start + PREFILL_CHUNK], cache,
                                         start_position=start)
        return logits, cache

    def generate_stream(self, prompt_ids, max_new_tokens: int,
                        stop_ids: Iterable[int] = ()) -> Iterator[int]:
        """Greedy generation: yields new token ids one by one, stopping after a stop id."""
        ids = validate_token_ids(prompt_ids, self.config.vocab_size, name="prompt token ids")
        require(isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0,
                f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
        self.check_length(ids.size + max_new_tokens, "prompt plus max_new_tokens")
        if max_new_tokens == 0:
            return
        stop = set(int(s) for s in stop_ids)
        capacity = round_up(self.prefill_slots(ids.size) + max_new_tokens, 256)
        logits, cache = self.prefill_prompt(ids, self.new_cache(capacity))
        token = jnp.argmax(logits).astype(jnp.int32)
        position = ids.size
        for step in range(max_new_tokens):
            value = int(token)
            yield value
            if value in stop or step == max_new_tokens - 1:
                return
            token, cache = self.decode_step(token, position, step, cache)
            position += 1

    def generate(self, prompt_ids, max_new_tokens: int, stop_ids: Iterable[int] = (),
                 on_token: Optional[Callable[[int], None]] = None) -> list[int]:
        """Greedy generation; returns the new token ids (including a final stop id)."""
        out = []
        for token in self.generate_stream(prompt_ids, max_new_tokens, stop_ids):
            out.append(token)
            if on_token is not None:
                on_token(token)
        return out
