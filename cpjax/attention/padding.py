"""Padding rows to a block multiple: padded rows are invisible (segment ``PAD_SEGMENT``).

A leaf module (imports jax and ``masks``) so that ``pallas_kernels`` may use it.
"""

from __future__ import annotations

import jax.numpy as jnp

from cpjax.attention.masks import PAD_SEGMENT


def pad_rows(x, multiple: int, value):
    """Pad axis 0 of ``x [T, ...]`` up to ``[ceil(T / multiple) * multiple, ...]`` with
    ``value``."""
    x = jnp.asarray(x)
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


def pad_kv_rows(k, v, kv_pos, kv_seg, multiple: int):
    """``k, v [Tk, Hkv, D]`` and int32 ``kv_pos, kv_seg [Tk]`` padded to a multiple of rows;
    padding rows carry segment ``PAD_SEGMENT`` (invisible)."""
    return (
        pad_rows(k, multiple, 0),
        pad_rows(v, multiple, 0),
        pad_rows(kv_pos.astype(jnp.int32), multiple, 0),
        pad_rows(kv_seg.astype(jnp.int32), multiple, PAD_SEGMENT),
    )


def pad_query_rows(q, q_pos, q_seg, multiple: int):
    """``q [Tq, Hq, D]`` and int32 ``q_pos, q_seg [Tq]`` padded to a multiple of rows; padding
    rows carry segment ``PAD_SEGMENT`` (they see nothing)."""
    return (
        pad_rows(q, multiple, 0),
        pad_rows(q_pos.astype(jnp.int32), multiple, 0),
        pad_rows(q_seg.astype(jnp.int32), multiple, PAD_SEGMENT),
    )
