"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

The parameters enter the compiled decode step as traced scalars, so changing them never
recompiles. Randomness is reproducible and independent of the mesh: the key of sequence ``b`` at
decode step ``s`` is ``fold_in(fold_in(PRNGKey(seed), s + 1), b)`` (the first token of turn
``k`` uses ``FIRST_TOKEN_KEYS + k`` for ``s + 1``), so every context-parallel strategy draws the
same token as the single-device engine.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cpjax.errors import require


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens.

    Attributes:
      temperature: 0 = greedy (argmax); otherwise logits are divided by it (> 0).
      top_k: keep only the k most likely tokens (0 = all).
      top_p: keep the smallest set of most likely tokens whose probability reaches p (1 = all).
      seed: random seed of the sampler.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        require(
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0,
            f"temperature={self.temperature!r}: must be a finite number >= 0 (0 means greedy)",
        )
        require(
            isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0,
            f"top_k={self.top_k!r}: must be an integer >= 0 (0 keeps every token)",
        )
        require(
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
            f"top_p={self.top_p!r}: must be in (0, 1] (1 keeps every token)",
        )
        require(
            isinstance(self.seed, (int, np.integer)) and 0 <= self.seed < 2**32,
            f"seed={self.seed!r}: must be an integer in [0, 2**32)",
        )

    def as_arrays(self) -> tuple:
        """``(key, temperature, top_k, top_p)`` for the compiled samplers, as host (numpy)
        values: a decode step puts them on the devices with its other inputs in one transfer
        (building them as jax arrays cost 1.2 ms of host time per step, the key alone 0.6)."""
        return (
            _raw_key(self.seed),
            np.float32(self.temperature),
            np.int32(self.top_k),
            np.float32(self.top_p),
        )


@functools.lru_cache(maxsize=64)
def _raw_key(seed: int) -> np.ndarray:
    """``jax.random.PRNGKey(seed)`` as a read-only host array (made once per seed)."""
    key = np.asarray(jax.random.PRNGKey(seed))
    key.setflags(write=False)
    return key


GREEDY = Sampling()
FIRST_TOKEN_KEYS = 1 << 30  # key indices of the tokens drawn from prefill logits


def _filtered_logits(logits, temperature, top_k, top_p):
    """``[V]`` logits / temperature with the tokens outside top-k and top-p set to -inf."""
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    ranked = scaled[order]
    rank = jnp.arange(ranked.shape[0])
    probs = jax.nn.softmax(ranked)
    before = jnp.cumsum(probs) - probs  # mass of the strictly more likely tokens
    keep = (before < top_p) & ((top_k == 0) | (rank < top_k))
    keep = keep.at[0].set(True)
    kept = jnp.where(keep, ranked, -jnp.inf)
    return jnp.full_like(scaled, -jnp.inf).at[order].set(kept)


def sample_one(logits, key, temperature, top_k, top_p):
    """Next token ``[]`` int32 from ``logits [V]``; greedy when ``temperature == 0``."""
    greedy = jnp.argmax(logits).astype(jnp.int32)
    drawn = jax.random.categorical(key, _filtered_logits(logits, temperature, top_k, top_p))
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)


def sample(logits, key, step, sequence_ids, temperature, top_k, top_p):
    """Next tokens ``[B]`` from ``logits [B, V]``; ``sequence_ids [B]`` pick each row's key.

    Greedy (``temperature == 0``) skips the sort that top-k/top-p filtering needs.
    """

    def drawn():
        step_key = jax.random.fold_in(key, step)
        keys = jax.vmap(lambda b: jax.random.fold_in(step_key, b))(sequence_ids)
        return jax.vmap(sample_one, in_axes=(0, 0, None, None, None))(
            logits, keys, temperature, top_k, top_p
        )

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, drawn, greedy)
