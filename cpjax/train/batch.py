"""Training batches as one packed row: ``[B, S]`` token rows to tokens, positions, segments,
next-token targets and loss weights ``[B * S]``.

cpjax's model runs on one packed row (``cpjax.model.decoder``), so a batch of ``B`` rows of
``S`` tokens is one row of ``B * S`` tokens in which every document is its own segment: no token
attends across a row or document boundary, every document's positions start at 0, and the
context-parallel layout balances each document over the ranks. Each token's target is the next
token of the same document; the last token of a document, padding, and (with a loss mask)
tokens whose target is not a completion token get weight 0.

The loss of a batch is ``sum(weights * nll) / sum(weights)``: the mean next-token NLL over all
target tokens of the batch (HF's ``labels=input_ids`` loss when each row is one document).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from cpjax.attention.masks import PAD_SEGMENT
from cpjax.errors import require


class PackedBatch(NamedTuple):
    """One packed row of ``T = B * S`` slots (numpy, host side).

    Attributes:
      tokens, positions, segments: ``[T]`` int32; segment ``-1`` marks padding.
      targets: ``[T]`` int32, the next token of the same document (0 where there is none).
      weights: ``[T]`` float32, 1 where the prediction of ``targets`` counts in the loss.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    @property
    def n_targets(self) -> int:
        """How many predictions the loss averages over."""
        return int(self.weights.sum())


def _as_rows(name: str, value, shape: Optional[tuple], dtype) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim == 1:
        array = array[None]
    require(array.ndim == 2, f"{name}: expected [B, S] (or [S]), got shape {array.shape}")
    require(
        shape is None or array.shape == shape,
        f"{name}: shape {array.shape} differs from the tokens' {shape}",
    )
    return array.astype(dtype)


def _positions_in_runs(segments: np.ndarray) -> np.ndarray:
    """``[B, S]`` index of each slot within its run of equal segment ids."""
    rows, width = segments.shape
    new_run = np.ones_like(segments, dtype=bool)
    new_run[:, 1:] = segments[:, 1:] != segments[:, :-1]
    slot = np.broadcast_to(np.arange(width), (rows, width))
    run_start = np.maximum.accumulate(np.where(new_run, slot, 0), axis=1)
    return (slot - run_start).astype(np.int32)


def _check_runs(segments: np.ndarray) -> None:
    """Each document id must be one contiguous run within its row."""
    for b, row in enumerate(segments):
        starts = row[np.flatnonzero(np.diff(row, prepend=row[0] - 1) != 0)]
        real = starts[starts >= 0]
        require(
            len(set(real.tolist())) == len(real),
            f"segments: row {b} splits a document into several runs ({row.tolist()[:32]}...); "
            f"each document id must be one contiguous run of its row",
        )


def pack_batch(tokens, segments=None, loss_mask=None, vocab_size: Optional[int] = None):
    """Pack a batch of token rows into one row with targets and loss weights.

    Args:
      tokens: ``[B, S]`` (or ``[S]``) token ids.
      segments: optional ``[B, S]`` document ids within each row (several documents packed in
        a row), each one contiguous run; ``-1`` marks padding. Default: one document per row.
      loss_mask: optional ``[B, S]`` bool: which tokens are predicted in the loss (e.g. the
        completion tokens of chat data). Default: every token after a document's first.
      vocab_size: if given, every token must be below it.

    Returns:
      :class:`PackedBatch` of ``B * S`` slots; row ``b``'s document ``d`` is segment
      ``b * (max id + 1) + d``.
    """
    tokens = _as_rows("tokens", tokens, None, np.int64)
    rows, width = tokens.shape
    require(rows >= 1 and width >= 2, f"tokens: shape {tokens.shape}: need S >= 2 tokens a row")
    if vocab_size is not None:
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        require(
            bad.size == 0,
            f"tokens: id {int(bad[0]) if bad.size else 0} is outside the vocabulary "
            f"[0, {vocab_size})",
        )
    segments = (
        np.zeros((rows, width), np.int64)
        if segments is None
        else _as_rows("segments", segments, tokens.shape, np.int64)
    )
    require(
        (segments >= PAD_SEGMENT).all(), f"segments: ids must be >= 0 (or {PAD_SEGMENT}: padding)"
    )
    _check_runs(segments)
    mask = (
        np.ones((rows, width), bool)
        if loss_mask is None
        else _as_rows("loss_mask", loss_mask, tokens.shape, bool)
    )

    real = segments >= 0
    span = int(segments.max()) + 1 if real.any() else 1
    global_segments = np.where(real, segments + span * np.arange(rows)[:, None], PAD_SEGMENT)
    positions = np.where(real, _positions_in_runs(segments), 0)

    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    same_document = np.zeros_like(real)
    same_document[:, :-1] = real[:, :-1] & (segments[:, 1:] == segments[:, :-1])
    predicted = np.zeros_like(mask)
    predicted[:, :-1] = mask[:, 1:]
    weights = same_document & predicted
    flat = lambda x, dtype: x.reshape(-1).astype(dtype)  # noqa: E731
    return PackedBatch(
        tokens=flat(np.where(real, tokens, 0), np.int32),
        positions=flat(positions, np.int32),
        segments=flat(global_segments, np.int32),
        targets=flat(np.where(weights, targets, 0), np.int32),
        weights=flat(weights, np.float32),
    )
