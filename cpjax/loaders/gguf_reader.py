"""Opening a GGUF file with clear errors, and reading its metadata as Python values."""

from __future__ import annotations

import os

from cpjax.errors import CpjaxError, require


def open_gguf(path):
    """A ``gguf.GGUFReader`` for ``path``; :class:`CpjaxError` if missing, truncated or corrupt."""
    from gguf import GGUFReader

    path = os.fspath(path)
    require(os.path.isfile(path), f"model file {path!r} does not exist")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError ... on bad data
        raise CpjaxError(
            f"model file {path!r} is not a readable GGUF file (truncated or "
            f"corrupt?): {type(exc).__name__}: {exc}"
        ) from None
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        require(
            tensor.data_offset + tensor.n_bytes <= size,
            f"model file {path!r} is truncated: tensor {tensor.name!r} ends at byte "
            f"{tensor.data_offset + tensor.n_bytes} but the file has {size} bytes",
        )
    return reader


def field(reader, key: str, default=None):
    """Metadata value ``key`` as a Python value (str, int, float, list), or ``default``."""
    entry = reader.fields.get(key)
    if entry is None:
        return default
    return entry.contents()
