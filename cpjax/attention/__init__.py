"""Attention: the ``attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)`` contract.

``get_attend(impl)`` returns one implementation of that contract:

* ``reference`` — dense jnp oracle (materialises the scores; tests and short inputs);
* ``blockwise`` — online softmax over key blocks in plain XLA, skipping masked blocks;
* ``pallas`` — the Pallas kernels of ``pallas_kernels`` (flash attention for prefill, split-K
  for a few queries against a long cache); interpreted on CPU, compiled (Triton) on GPU;
* ``pallas_mgpu`` — like ``pallas``, with the Hopper flash kernel (Pallas Mosaic GPU: TMA,
  ``wgmma``) for prefill; bf16/fp16, head_dim a multiple of 64; interpreted on CPU;
* ``cudnn`` — ``jax.nn.dot_product_attention(implementation="cudnn")`` with the mask built from
  positions and segments (GPU only; bf16; for comparison);
* ``auto`` — ``pallas`` on GPU, ``blockwise`` elsewhere.
"""

from __future__ import annotations

from typing import Callable

import jax

from cpjax.attention import blockwise, cudnn, reference
from cpjax.attention.merge import merge
from cpjax.errors import CpjaxError

Attend = Callable  # (q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> (out, lse)

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "pallas", "pallas_mgpu", "cudnn")
DECODE_MAX_QUERIES = 16   # at most this many queries: the split-K decode kernel


def pallas_attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None):
    """``attend`` by the Pallas kernels: split-K decode for few queries, flash otherwise."""
    from pallas_kernels import decode_attention, flash_attention

    if q.shape[0] <= DECODE_MAX_QUERIES:
        return decode_attention(q, k, v, kv_pos, kv_seg, q_pos, q_seg, window=window)
    return flash_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)


def pallas_mgpu_attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None):
    """``attend`` with the Hopper (Mosaic GPU) flash kernel; few queries go to
    :func:`pallas_attend` (its split-K decode kernel)."""
    if q.shape[0] <= DECODE_MAX_QUERIES:
        return pallas_attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)
    from pallas_kernels import flash_attention_mgpu

    return flash_attention_mgpu(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)


def with_past(attend: Attend) -> Callable:
    """The single-device attention plan of the model built from ``attend``.

    ``plan(q, k, v, positions, segments, past) -> (out, lse)``: the queries attend to the new
    keys/values and, when ``past = (k, v, pos, seg)`` is given, to those too; the two partial
    results merge by log-sum-exp.
    """
    def plan(q, k, v, positions, segments, past):
        out, lse = attend(q, k, v, positions, positions, segments, segments)
        if past is None:
            return out, lse
        past_out, past_lse = attend(q, *past[:2], positions, past[2], segments, past[3])
        out, lse = merge(out, lse, past_out, past_lse)
        return out.astype(q.dtype), lse
    return plan


def get_attend(impl: str = "auto") -> Attend:
    """The ``attend`` function called ``impl`` (one of :data:`IMPLEMENTATIONS`)."""
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "blockwise"
    if impl == "blockwise":
        return blockwise.attend
    if impl == "reference":
        return reference.attend
    if impl == "pallas":
        return pallas_attend
    if impl == "pallas_mgpu":
        return pallas_mgpu_attend
    if impl == "cudnn":
        return cudnn.attend
    raise CpjaxError(f"unknown attention implementation {impl!r}: choose one of "
                     f"{', '.join(IMPLEMENTATIONS)}")


__all__ = ["Attend", "IMPLEMENTATIONS", "get_attend", "merge", "pallas_attend", "pallas_mgpu_attend",
           "with_past"]
