"""A conversation whose KV cache persists between turns (paper: persistent-KV prefill).

Each turn is a partial prefill of the new tokens against everything cached so far, followed by
decoding. The cache holds every token the model has seen except the last generated one, which
is fed at the start of the next turn (or the next decode step).
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

import numpy as np

from cpjax.engine import validation as check
from cpjax.engine.sampling import GREEDY, Sampling
from cpjax.errors import require


class Session:
    """One sequence (segment ``segment``) with a persistent cache of ``capacity`` tokens.

    Works with an ``Engine`` on any placement. Attributes after a turn:
    ``position`` (tokens in the sequence so far, the pending one included), ``step`` (decode
    steps taken, which also places new K/V round-robin over context-parallel ranks),
    ``last_ttft_s`` and ``last_decode_tok_s``.
    """

    def __init__(self, engine, capacity: int, segment: int = 0):
        self.engine = engine
        self.capacity = capacity
        self.segment = segment
        self.cache = engine.new_cache(capacity)
        self.cached = 0
        self.step = 0
        self.pending: Optional[int] = None
        self.turns = 0
        self.last_ttft_s: Optional[float] = None
        self.last_decode_tok_s: Optional[float] = None

    @property
    def position(self) -> int:
        return self.cached + (self.pending is not None)

    def prefill(self, ids) -> np.ndarray:
        """Partial prefill of ``ids`` (after the pending token, if any); returns logits [V]."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size:
            ids = check.token_ids(ids, self.engine.config.vocab_size, name="turn token ids")
        ids = ids.astype(np.int32)
        if self.pending is not None:
            ids = np.concatenate([np.array([self.pending], np.int32), ids])
        require(ids.size > 0, "a turn needs at least one new token")
        self.engine.check_length(self.cached + ids.size, "conversation")
        logits, self.cache = self.engine.prefill_prompt(ids, self.cache, self.cached, self.segment)
        self.cached += ids.size
        self.pending = None
        return logits

    def turn(
        self, ids, max_new_tokens: int, stop_ids: Iterable[int] = (), sampling: Sampling = GREEDY
    ) -> Iterator[int]:
        """Prefill ``ids`` and yield up to ``max_new_tokens`` new tokens (stops after a stop id).

        The last yielded token stays pending: it enters the cache with the next turn.
        """
        require(
            isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0,
            f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0",
        )
        self.engine.check_length(
            self.position + np.size(ids) + max_new_tokens, "conversation plus max_new_tokens"
        )
        start = time.perf_counter()
        logits = self.prefill(ids)
        if max_new_tokens == 0:
            return
        stop = set(int(s) for s in stop_ids)
        token = int(self.engine.first_tokens(np.asarray(logits)[None], sampling, self.turns)[0])
        self.turns += 1
        self.last_ttft_s = time.perf_counter() - start
        self.pending = token
        yield token
        stamps = []
        for _ in range(max_new_tokens - 1):
            if token in stop:
                break
            _, tokens, self.cache = self.engine.decode(
                [token], [self.cached], [self.segment], self.step, self.cache, sampling
            )
            self.step += 1
            self.cached += 1
            token = int(np.asarray(tokens)[0])
            self.pending = token
            stamps.append(time.perf_counter())
            yield token
        # The first decode step may compile; the rate counts the ones after it.
        self.last_decode_tok_s = (
            (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
        )
