"""Atomic file writes: a result or array file is either the old one or the complete new one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path in ``path``'s directory; on success it replaces ``path``.

    The result gets the usual permissions (``0666`` less the umask), not ``mkstemp``'s ``0600``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path, ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")


def save_npy(path: str, array) -> None:
    """``np.save`` atomically (the file name is used as given)."""
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, np.asarray(array))


def save_figure(path: str, fig) -> None:
    """Save a matplotlib figure atomically (format from ``path``'s extension)."""
    ext = os.path.splitext(path)[1]
    with atomic_path(path, ext) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
