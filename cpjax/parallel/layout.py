"""Load-balanced sharding of token rows over the ``context`` axis (paper §2).

Each sequence of ``L`` tokens is cut, in order, into ``2N`` chunks of ``w = ceil(L / 2N)``
slots, the fewer than ``2N`` slots of padding spread one per chunk; rank ``r`` holds chunks
``r`` and ``2N-1-r``, so under the causal mask every rank does nearly the same attention work at
every ring step (exactly the same when ``L`` is a multiple of ``2N``; see
:func:`ring_step_work` for the bound). Several sequences packed in one row (the paper's fused
variable-length batch) are each balanced on their own and concatenated per rank. Padding
tokens get segment ``-1`` and never influence a real token.

Everything here is host-side numpy: a :class:`Layout` is computed once per input shape and
used to permute token ids, positions, segments and targets in, and outputs back.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from cpjax.attention.masks import PAD_SEGMENT
from cpjax.attention.plans import part_visible
from cpjax.errors import require


class Layout(NamedTuple):
    """Where every slot of the sharded row comes from.

    The sharded row has ``n_ranks * local_len`` slots; rank ``r`` owns slots
    ``[r * local_len, (r + 1) * local_len)``.

    Attributes:
      source: ``[n_ranks * local_len]`` int index into the packed input row, ``-1`` for padding.
      positions: ``[n_ranks * local_len]`` int32 global token positions (0 for padding).
      segments: ``[n_ranks * local_len]`` int32 sequence ids, ``-1`` for padding.
      n_ranks: N, the context-parallel size.
      local_len: slots per rank.
      total: length of the packed input row.
    """

    source: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    n_ranks: int
    local_len: int
    total: int

    def shard(self, values, fill=0) -> np.ndarray:
        """Permute ``values [total, ...]`` into the sharded row (padding slots = ``fill``)."""
        values = np.asarray(values)
        require(
            values.shape[0] == self.total,
            f"layout: values have {values.shape[0]} rows, the layout was built for {self.total}",
        )
        out = np.full((self.source.size,) + values.shape[1:], fill, dtype=values.dtype)
        real = self.source >= 0
        out[real] = values[self.source[real]]
        return out

    def real_per_rank(self) -> np.ndarray:
        """``[n_ranks]`` number of real (non-padding) slots on each rank."""
        return (self.source.reshape(self.n_ranks, self.local_len) >= 0).sum(axis=1)

    def rotated(self, shift: int) -> "Layout":
        """The same layout with rank ``r``'s slots moved to rank ``(r + shift) mod n_ranks``.

        Every rank still does the same work; used to put a short turn's tokens on the ranks
        whose caches hold the fewest.
        """
        roll = (shift % self.n_ranks) * self.local_len
        return self._replace(
            source=np.roll(self.source, roll),
            positions=np.roll(self.positions, roll),
            segments=np.roll(self.segments, roll),
        )

    def unshard(self, values) -> np.ndarray:
        """Inverse of :meth:`shard`: ``[n_ranks * local_len, ...]`` back to ``[total, ...]``."""
        values = np.asarray(values)
        out = np.empty((self.total,) + values.shape[1:], dtype=values.dtype)
        real = self.source >= 0
        out[self.source[real]] = values[real]
        return out


def chunk_counts(length: int, n_ranks: int) -> np.ndarray:
    """``[2 * n_ranks]`` real tokens in each chunk of one sequence of ``length`` tokens.

    Chunks are ``w = ceil(length / 2N)`` rows wide; the ``p = 2N * w - length < 2N`` rows of
    padding go one per chunk, first to the late chunks ``N .. 2N-1`` (one of each rank), then
    to the early chunks ``0 .. N-1``. So every chunk holds ``w - 1`` or ``w`` tokens and every
    rank ``floor(length / N)`` or ``ceil(length / N)``, which bounds each ring step's work (see
    :func:`ring_step_work`).
    """
    n_chunks = 2 * n_ranks
    width = -(-length // n_chunks)
    pad = n_chunks * width - length
    counts = np.full(n_chunks, width, np.int64)
    counts[np.roll(np.arange(n_chunks), -n_ranks)[:pad]] -= 1
    return counts


def balanced_chunks(length: int, n_ranks: int, pad_multiple: int = 1) -> list[np.ndarray]:
    """For one sequence: per rank, the indices (``-1`` = padding) it holds, in order.

    The sequence is cut, in order, into ``2 * n_ranks`` chunks of :func:`chunk_counts` tokens,
    each written at the front of ``width`` slots, ``width`` being ``ceil(length / 2N)`` rounded
    up to a multiple of ``pad_multiple`` (shape bucketing); the rest of a chunk is padding.
    Rank ``r`` gets chunks ``r`` and ``2 * n_ranks - 1 - r``. Returns ``n_ranks`` arrays of
    ``2 * width`` indices.
    """
    n_chunks = 2 * n_ranks
    counts = chunk_counts(length, n_ranks)
    tight = -(-length // n_chunks)
    width = -(-tight // pad_multiple) * pad_multiple
    starts = np.cumsum(counts) - counts
    slot = np.arange(width)
    chunks = np.where(slot < counts[:, None], starts[:, None] + slot, -1)  # [2N, width]
    return [np.concatenate([chunks[r], chunks[n_chunks - 1 - r]]) for r in range(n_ranks)]


def balanced_layout(
    lengths: Sequence[int],
    n_ranks: int,
    start_positions: Optional[Sequence[int]] = None,
    segment_ids: Optional[Sequence[int]] = None,
    pad_multiple: int = 1,
) -> Layout:
    """Layout of a packed row holding sequences of ``lengths`` (in that order).

    Args:
      lengths: token count of each packed sequence (each >= 1).
      n_ranks: context-parallel size N.
      start_positions: global position of each sequence's first token (default 0; a follow-up
        turn starts after its cached prefix).
      segment_ids: segment id of each sequence (default 0, 1, 2, ...).
      pad_multiple: pad each of a sequence's ``2 * n_ranks`` chunks to a multiple of this many
        rows (bucketing, so that few distinct shapes are compiled).
    """
    lengths = [int(n) for n in lengths]
    require(n_ranks >= 1, f"n_ranks={n_ranks}: must be >= 1")
    require(
        len(lengths) >= 1 and all(n >= 1 for n in lengths),
        f"lengths={lengths}: need at least one sequence, each with >= 1 token",
    )
    starts = [0] * len(lengths) if start_positions is None else list(start_positions)
    segs = list(range(len(lengths))) if segment_ids is None else list(segment_ids)
    require(
        len(starts) == len(lengths) and len(segs) == len(lengths),
        "start_positions and segment_ids need one entry per sequence",
    )
    require(all(s >= 0 for s in segs), f"segment_ids={segs}: must be >= 0 (-1 is padding)")

    offsets = np.cumsum([0] + lengths[:-1])
    per_rank_source = [[] for _ in range(n_ranks)]
    per_rank_pos = [[] for _ in range(n_ranks)]
    per_rank_seg = [[] for _ in range(n_ranks)]
    for length, offset, start, seg in zip(lengths, offsets, starts, segs):
        for r, local in enumerate(balanced_chunks(length, n_ranks, pad_multiple)):
            real = local >= 0
            per_rank_source[r].append(np.where(real, local + offset, -1))
            per_rank_pos[r].append(np.where(real, local + start, 0))
            per_rank_seg[r].append(np.where(real, seg, PAD_SEGMENT))
    flat = lambda parts: np.concatenate([np.concatenate(p) for p in parts])  # noqa: E731
    source = flat(per_rank_source)
    return Layout(
        source=source.astype(np.int64),
        positions=flat(per_rank_pos).astype(np.int32),
        segments=flat(per_rank_seg).astype(np.int32),
        n_ranks=n_ranks,
        local_len=source.size // n_ranks,
        total=int(sum(lengths)),
    )


def ring_step_work(layout: Layout) -> np.ndarray:
    """``[n_ranks, n_ranks]`` visible (query, key) pairs of each pass-KV ring step per rank.

    Entry ``[j, r]`` counts the pairs of rank ``r``'s queries with the keys of rank
    ``(r - j) mod N``, the block rank ``r`` attends at step ``j``.

    Bound: at step ``j > 0`` each of a rank's chunks sees each chunk of the other rank fully or
    not at all, so its work is ``n_r * k_s`` (``s < r``) or ``k_{2N-1-r} * n_s`` (``s > r``)
    for chunk counts ``k`` in ``{w - 1, w}`` and rank counts ``n`` in ``[2w - 2, 2w]``
    (:func:`chunk_counts`); at step 0 it is ``n_r (n_r + 1) / 2``. Hence within a step the
    most loaded rank does at most ``(w / (w - 1))**2`` times the work of the least loaded
    (``w >= 2``; for a packed row, ``w`` of its shortest sequence).
    """
    n = layout.n_ranks
    pos = layout.positions.reshape(n, layout.local_len)
    seg = layout.segments.reshape(n, layout.local_len)
    work = np.zeros((n, n), np.int64)
    for r in range(n):
        for j in range(n):
            s = (r - j) % n
            for sid in np.unique(seg[r][seg[r] >= 0]):
                keys = np.sort(pos[s][seg[s] == sid])
                work[j, r] += np.searchsorted(keys, pos[r][seg[r] == sid], side="right").sum()
    return work


def attended_ring_steps(layout: Layout, window: Optional[int] = None) -> np.ndarray:
    """``[n_ranks, n_ranks]`` bool: entry ``[j, r]`` is whether rank ``r`` runs attention at
    pass-KV step ``j`` (its queries against rank ``(r - j) mod N``'s new keys) with a sliding
    ``window``; False where ``cpjax.attention.plans.part_visible`` proves the step invisible and
    the implementation skips it. With a window of one layout chunk, a rank attends at most 3 of
    its N steps (its two chunks' own and preceding chunks)."""
    n = layout.n_ranks
    pos = layout.positions.reshape(n, layout.local_len)
    seg = layout.segments.reshape(n, layout.local_len)
    visible = np.zeros((n, n), bool)
    for r in range(n):
        for j in range(n):
            s = (r - j) % n
            visible[j, r] = bool(part_visible(pos[r], seg[r], pos[s], seg[s], window))
    return visible


def causal_work_per_rank(layout: Layout) -> np.ndarray:
    """``[n_ranks]`` number of visible (query, key) pairs each rank's queries have in total."""
    return ring_step_work(layout).sum(axis=0)


def padded_layout(positions, segments, rows_multiple: int) -> Layout:
    """One-rank layout of a packed row as it is (any positions), padded at the end to a
    multiple of ``rows_multiple`` rows (shape bucketing; padding rows get PAD_SEGMENT)."""
    positions = np.asarray(positions, np.int32)
    total = positions.size
    size = max(rows_multiple, -(-total // rows_multiple) * rows_multiple)
    pad = size - total
    return Layout(
        source=np.concatenate([np.arange(total), np.full(pad, -1)]).astype(np.int64),
        positions=np.concatenate([positions, np.zeros(pad, np.int32)]),
        segments=np.concatenate(
            [np.asarray(segments, np.int32), np.full(pad, PAD_SEGMENT, np.int32)]
        ),
        n_ranks=1,
        local_len=size,
        total=total,
    )


def segment_runs(positions: np.ndarray, segments: np.ndarray):
    """Split a packed row into its sequences: ``(lengths, start_positions, segment_ids)``.

    Each run of equal segment ids must hold consecutive positions (a CpjaxError otherwise), as
    the balanced layout cuts each sequence into chunks by position.
    """
    starts = np.flatnonzero(np.diff(segments, prepend=segments[0] - 1) != 0)
    ends = np.append(starts[1:], segments.size)
    lengths, first_positions, ids = [], [], []
    for a, b in zip(starts, ends):
        run = positions[a:b]
        require(
            np.array_equal(run, run[0] + np.arange(b - a)),
            f"positions of segment {segments[a]} (rows {a}..{b - 1}) must be consecutive "
            f"for context-parallel sharding",
        )
        lengths.append(int(b - a))
        first_positions.append(int(run[0]))
        ids.append(int(segments[a]))
    require(len(set(ids)) == len(ids), f"segment ids {ids}: each segment must be one run")
    return lengths, first_positions, ids
