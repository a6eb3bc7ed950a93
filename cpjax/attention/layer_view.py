"""One layer of a layer-stacked array, read in place: how a KV cache reaches attention.

The model scans its layers over a KV cache ``[L, C, Hkv, Dh]``. Slicing each layer's
``[C, Hkv, Dh]`` out of the stack inside the scan is a copy (XLA materialises a loop's dynamic
slice once a loop or conditional consumes it), so every decode step would read and write the
whole cache per layer, even where a sliding window hides all but a few of its blocks. A
:class:`LayerView` instead hands attention the stack and the layer index: an implementation that
reads keys by blocks (``cpjax.attention.blockwise``, marked with :data:`READS_LAYER_VIEWS`)
slices each block it attends straight from the stack; every other one gets the layer
materialised first (:func:`materializing`).

A leaf module: it imports only jax.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax

#: Attribute an ``attend`` function sets to True when it accepts :class:`LayerView` keys and
#: values (``functools.wraps`` carries it over to wrappers).
READS_LAYER_VIEWS = "reads_layer_views"


class LayerView(NamedTuple):
    """Layer ``layer`` of ``stack [L, T, ...]``, read in place (shape ``[T, ...]``).

    ``layer`` is an int32 scalar (traced inside the layer scan).
    """

    stack: jax.Array
    layer: jax.Array

    @property
    def shape(self) -> tuple:
        return tuple(self.stack.shape[1:])

    @property
    def dtype(self):
        return self.stack.dtype

    @property
    def ndim(self) -> int:
        return self.stack.ndim - 1

    def rows(self, start, size: int):
        """``[size, ...]``: rows ``[start, start + size)`` of the layer (one dynamic slice of
        the stack, which XLA fuses into its consumer)."""
        starts = (self.layer, start) + (0,) * (self.stack.ndim - 2)
        return jax.lax.dynamic_slice(self.stack, starts, (1, size, *self.stack.shape[2:]))[0]

    def materialize(self):
        """The layer as an array ``[T, ...]`` (a copy)."""
        return jax.lax.dynamic_index_in_dim(self.stack, self.layer, keepdims=False)

    def astype(self, dtype):
        """Itself if already of ``dtype``, else the materialised layer cast to it."""
        return self if dtype == self.dtype else self.materialize().astype(dtype)


def materialized(x):
    """``x`` as an array: a :class:`LayerView` materialised, anything else unchanged."""
    return x.materialize() if isinstance(x, LayerView) else x


def materializing(attend: Callable) -> Callable:
    """``attend`` taking :class:`LayerView` keys/values: unchanged if it reads views itself
    (:data:`READS_LAYER_VIEWS`), else wrapped to materialise them first."""
    if getattr(attend, READS_LAYER_VIEWS, False):
        return attend

    @functools.wraps(attend)
    def wrapped(q, k, v, *args, **kwargs):
        return attend(q, materialized(k), materialized(v), *args, **kwargs)

    setattr(wrapped, READS_LAYER_VIEWS, True)
    return wrapped
