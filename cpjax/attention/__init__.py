"""Attention: the ``attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)`` contract.

``get_attend(impl)`` returns one implementation of that contract:

* ``reference`` — dense jnp oracle (materialises the scores; tests and short inputs);
* ``blockwise`` — online softmax over key blocks in plain XLA, skipping masked blocks;
* ``auto`` — the fastest available implementation for the current platform.
"""

from __future__ import annotations

from typing import Callable

from cpjax.attention import blockwise, reference
from cpjax.attention.merge import merge
from cpjax.errors import CpjaxError

Attend = Callable  # (q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)

IMPLEMENTATIONS = ("auto", "reference", "blockwise")


def get_attend(impl: str = "auto") -> Attend:
    """The ``attend`` function called ``impl`` (one of :data:`IMPLEMENTATIONS`)."""
    if impl in ("auto", "blockwise"):
        return blockwise.attend
    if impl == "reference":
        return reference.attend
    raise CpjaxError(f"unknown attention implementation {impl!r}: choose one of "
                     f"{', '.join(IMPLEMENTATIONS)}")


__all__ = ["Attend", "IMPLEMENTATIONS", "get_attend", "merge"]
