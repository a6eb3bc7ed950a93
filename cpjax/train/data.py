"""Training data: a 1-D token stream cut into sequences, read in a fixed order.

The stream's ``N`` tokens make ``N // seq_len`` sequences (the tail shorter than one is
dropped). Step after step the run reads ``batch_size * grad_accum`` consecutive sequences,
wrapping around at the end; the *data position* (sequences read so far) is all a resumed run
needs to continue with exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np

from cpjax.errors import CpjaxError, require


def read_ids_file(path: str) -> np.ndarray:
    """A ``.npy`` file of a 1-D integer token stream, as int32."""
    require(os.path.isfile(path), f"--ids-file {path!r}: no such file")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CpjaxError(f"--ids-file {path!r}: not a .npy array ({exc})") from None
    require(
        ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer),
        f"--ids-file {path!r}: expected a 1-D integer array of token ids, got "
        f"{ids.dtype}{list(ids.shape)}",
    )
    return ids.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Sequences of ``seq_len`` tokens cut from ``ids [N]`` in order."""

    ids: np.ndarray
    seq_len: int

    def __post_init__(self):
        require(
            isinstance(self.seq_len, int) and self.seq_len >= 2,
            f"seq_len={self.seq_len!r}: must be an int >= 2",
        )
        require(
            self.ids.size >= self.seq_len,
            f"the token stream has {self.ids.size} tokens, shorter than one sequence of "
            f"seq_len={self.seq_len}",
        )

    @property
    def n_sequences(self) -> int:
        return self.ids.size // self.seq_len

    def sequences(self, position: int, count: int) -> np.ndarray:
        """``[count, seq_len]``: sequences ``position, position + 1, ...`` (mod the total)."""
        index = (position + np.arange(count)) % self.n_sequences
        starts = index[:, None] * self.seq_len + np.arange(self.seq_len)
        return self.ids[starts]

    def fingerprint(self) -> dict:
        """What identifies the data for a resume: size and a CRC-32 of the tokens."""
        return {
            "tokens": int(self.ids.size),
            "seq_len": self.seq_len,
            "crc32": zlib.crc32(np.ascontiguousarray(self.ids).tobytes()),
        }
