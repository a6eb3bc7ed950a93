"""Input checks of the engine's public methods, each rule written once.

Every check returns the validated value (as the int32 numpy array or plain ints the engine
uses) or raises a :class:`CpjaxError` that names the argument, the offending value and the rule.
The engine calls them once, at its public entry points; placements and step bodies trust their
inputs.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from cpjax.config import ModelConfig
from cpjax.errors import CpjaxError, require
from cpjax.names import DTYPES


def int_array(
    values,
    length: Optional[int],
    name: str,
    *,
    low: int = 0,
    high: Optional[int] = None,
    rule: str = "",
    item: str = "value",
) -> np.ndarray:
    """``values`` as a 1-D int32 array (of ``length`` entries unless None) of integers in
    ``[low, high)``; a :class:`CpjaxError` naming ``name``, the offending ``item`` and the rule
    otherwise."""
    arr = np.asarray(values)
    if length is None:
        require(arr.ndim == 1, f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    else:
        require(arr.shape == (length,), f"{name}: expected shape ({length},), got {arr.shape}")
    require(
        np.issubdtype(arr.dtype, np.integer) or arr.size == 0,
        f"{name}: must be integers, got dtype {arr.dtype}",
    )
    bad = np.flatnonzero((arr < low) | (arr >= (high if high is not None else np.inf)))
    if bad.size:
        allowed = f"is outside [{low}, {high})" if high is not None else f"is below {low}"
        raise CpjaxError(
            f"{name}: {item} {arr[bad[0]]} at index {bad[0]} {allowed}"
            + (f" ({rule})" if rule else "")
        )
    return arr.astype(np.int32)


def token_ids(ids, vocab_size: int, *, name: str = "token ids") -> np.ndarray:
    """``ids`` as a non-empty 1-D int32 array of ids in ``[0, vocab_size)``."""
    require(np.size(ids) > 0 or np.ndim(ids) != 1, f"{name}: empty (at least one token is needed)")
    return int_array(ids, None, name, high=vocab_size, rule="the vocabulary size", item="token id")


def positions(values, length: int, config: ModelConfig, name: str = "positions") -> np.ndarray:
    """``[length]`` int32 positions inside the model's context window."""
    return int_array(
        values,
        length,
        name,
        high=config.max_seq_len,
        rule=f"the context window of model {config.name!r}",
    )


def segments(values, length: int, name: str = "segments") -> np.ndarray:
    """``[length]`` int32 segment ids >= 0 (padding is the engine's business)."""
    return int_array(values, length, name, rule="segment ids are >= 0; padding is added internally")


def fits_window(config: ModelConfig, n_tokens: int, what: str = "prompt") -> None:
    """Raise unless ``n_tokens`` fits the model's context window."""
    require(
        n_tokens <= config.max_seq_len,
        f"{what} needs {n_tokens} tokens, more than the context window of "
        f"{config.max_seq_len} tokens of model {config.name!r}",
    )


def count(value, name: str, *, low: int = 0) -> int:
    """An integer >= ``low`` (max_new_tokens, step ...)."""
    require(
        isinstance(value, (int, np.integer)) and value >= low,
        f"{name}={value!r}: must be an integer >= {low}",
    )
    return int(value)


def capacity(value) -> int:
    """A KV cache capacity: an integer >= 1 (tokens)."""
    require(
        isinstance(value, (int, np.integer)) and value >= 1,
        f"capacity={value!r}: a KV cache needs an integer capacity >= 1 (tokens)",
    )
    return int(value)


def dtype(value) -> jnp.dtype:
    """``float32`` or ``bfloat16`` as a jnp dtype."""
    try:
        resolved = jnp.dtype(value)
    except TypeError:
        resolved = None
    require(
        resolved is not None and resolved.name in DTYPES,
        f"dtype={getattr(resolved, 'name', value)!r}: choose {' or '.join(DTYPES)}",
    )
    return resolved


def scored(ids, targets, vocab_size: int):
    """``(ids, targets)`` validated as token ids of the same shape."""
    ids = token_ids(ids, vocab_size)
    targets = token_ids(targets, vocab_size, name="targets")
    require(
        targets.shape == ids.shape,
        f"targets: shape {targets.shape} must equal the ids' {ids.shape}",
    )
    return ids, targets


def split_points(split_at, n_scored: int) -> list[int]:
    """``split_at`` (``K`` or increasing ``[K1, ...]``) cutting ``n_scored`` tokens into
    non-empty pieces."""
    splits = [int(k) for k in np.atleast_1d(split_at)]
    require(
        all(a < b for a, b in zip([0, *splits], [*splits, n_scored])),
        f"split_at={splits}: split points must increase strictly within "
        f"[1, {n_scored - 1}] (the {n_scored} scored tokens must be cut into "
        f"non-empty pieces)",
    )
    return splits


def turns(config: ModelConfig, lengths, segment_ids, start_positions):
    """Validated ``(segments, starts)`` (lists of ints) for new sequences of ``lengths``: one
    distinct segment id >= 0 and one start position >= 0 each (defaults: ``0..B-1`` and 0),
    and room for each in the context window."""
    n = len(lengths)
    segs = int_array(
        range(n) if segment_ids is None else list(segment_ids),
        n,
        "segments",
        rule="segment ids are >= 0",
    ).tolist()
    require(len(set(segs)) == n, f"segments={segs}: need one distinct id >= 0 per sequence ({n})")
    starts = int_array(
        [0] * n if start_positions is None else list(start_positions), n, "start_positions"
    ).tolist()
    for length, start in zip(lengths, starts):
        fits_window(config, start + length, "cached plus new tokens")
    return segs, starts


def sequences(config: ModelConfig, values, segment_ids=None, start_positions=None):
    """Validated ``(ids list, segments, starts)`` of a batch of (partial) prefills."""
    require(
        isinstance(values, (list, tuple)) and len(values) > 0,
        "sequences: expected a non-empty list of token id arrays",
    )
    ids = [
        token_ids(x, config.vocab_size, name=f"sequence {i} token ids")
        for i, x in enumerate(values)
    ]
    return (ids, *turns(config, [x.size for x in ids], segment_ids, start_positions))


def continues_cache(next_positions: dict, segment_ids, start_positions) -> None:
    """Each new sequence must continue its segment exactly where the cache left it
    (``next_positions``: segment id -> position after its last cached token)."""
    for seg, start in zip(segment_ids, start_positions):
        expected = next_positions[seg]
        require(
            start == expected,
            f"turn of segment {seg} starts at position {start}, but the cache holds "
            f"that segment up to position {expected - 1} (the next turn must start at "
            f"{expected}); pass the right segment id or start position",
        )


def model_and_placement(config, placement) -> None:
    """``config`` must be a ModelConfig and ``placement`` a ``SingleDevice`` or
    ``ContextParallel`` that can hold it (heads and FFN split over its tensor axis)."""
    from cpjax.engine.placement import ContextParallel, SingleDevice

    require(
        isinstance(config, ModelConfig),
        f"config: expected a ModelConfig, got {type(config).__name__}",
    )
    require(
        isinstance(placement, (SingleDevice, ContextParallel)),
        f"placement: expected SingleDevice() or ContextParallel(mesh, ...), got "
        f"{type(placement).__name__}",
    )
    placement.check_model(config)
