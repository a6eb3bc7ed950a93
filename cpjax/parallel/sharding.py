"""The one table that maps logical array axes to mesh axes.

Models name the axes of their arrays (``q_heads``, ``ffn``, ``sequence`` ...); this table says
which mesh axis shards each. Changing the parallel layout means editing :data:`RULES`, not the
model: outside ``shard_map`` the rules give each array's ``PartitionSpec``; inside it, given the
sizes of the mesh axes (``mesh_axis_sizes``, pairs ``(axis name, size)``), they give each
array's local shard shape and the mesh axes a contraction must be summed over.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import PartitionSpec as P

from cpjax.errors import require
from cpjax.parallel.mesh import CONTEXT, TENSOR

#: Logical axis -> mesh axis (an axis not listed, or mapped to None, is replicated).
RULES: dict[str, Optional[str]] = {
    "sequence": CONTEXT,  # tokens of the packed row, in load-balanced layout order
    "q_heads": TENSOR,
    "kv_heads": TENSOR,
    "ffn": TENSOR,
}

#: ``((mesh axis, size), ...)``: the mesh a ``shard_map`` body runs inside; ``()`` = none.
MeshAxisSizes = tuple[tuple[str, int], ...]


def mesh_axes(logical_axes: tuple) -> tuple:
    """The mesh axis (or None) of each of ``logical_axes``; a :class:`CpjaxError` when two of
    them map to the same mesh axis (a mesh axis can split one dimension of an array only)."""
    mapped = tuple(RULES.get(a) for a in logical_axes)
    for i, axis in enumerate(mapped):
        other = mapped.index(axis)
        require(
            axis is None or other == i,
            f"sharding RULES map logical axes {logical_axes[other]!r} and "
            f"{logical_axes[i]!r} of one array (axes {logical_axes}) both to mesh axis "
            f"{axis!r}: a mesh axis can shard one dimension of an array only",
        )
    return mapped


def spec(logical_axes: tuple) -> P:
    """PartitionSpec of an array whose axes carry ``logical_axes`` (None = replicated axis)."""
    return P(*mesh_axes(logical_axes))


def tree_specs(axes_tree, like):
    """PartitionSpecs for the leaves of ``like``, from the matching entries of ``axes_tree``."""

    def lookup(path, _):
        node = axes_tree
        for key in path:
            node = node[key.key]
        return spec(node)

    return jax.tree_util.tree_map_with_path(lookup, like)


def split_axes(logical_axes: tuple, mesh_axis_sizes: MeshAxisSizes) -> tuple:
    """Per axis, ``(mesh axis, size)`` of the mesh axis that splits it inside a ``shard_map``
    over ``mesh_axis_sizes``, or None where it stays whole (unmapped, or size 1, or absent)."""
    sizes = dict(mesh_axis_sizes)
    return tuple(
        None if sizes.get(axis, 1) == 1 else (axis, sizes[axis]) for axis in mesh_axes(logical_axes)
    )


def local_shape(
    name: str, shape: tuple, logical_axes: tuple, mesh_axis_sizes: MeshAxisSizes
) -> tuple:
    """The shape of one device's shard of array ``name`` (global ``shape``, axes
    ``logical_axes``) inside a ``shard_map`` over ``mesh_axis_sizes``; a :class:`CpjaxError`
    when a split dimension is not a multiple of its mesh axis size."""
    local = []
    for size, axis, split in zip(shape, logical_axes, split_axes(logical_axes, mesh_axis_sizes)):
        if split is not None:
            require(
                size % split[1] == 0,
                f"cannot shard {name} of shape {tuple(shape)} over mesh axis {split[0]!r} "
                f"of size {split[1]}: its {axis!r} dimension ({size}) is not a multiple of "
                f"{split[1]} (sharding RULES map {axis!r} to {split[0]!r})",
            )
            size //= split[1]
        local.append(size)
    return tuple(local)


def sum_axes(contracted_axes: tuple, mesh_axis_sizes: MeshAxisSizes) -> tuple[str, ...]:
    """The mesh axes a contraction over ``contracted_axes`` (logical) must be ``psum``-ed over:
    those that split one of them inside a ``shard_map`` over ``mesh_axis_sizes``."""
    return tuple(
        split[0] for split in split_axes(contracted_axes, mesh_axis_sizes) if split is not None
    )


def split_over(partition: P, shape: tuple, axis: str, size: int) -> P:
    """``partition`` with mesh ``axis`` (of ``size`` devices) added on the first dimension of
    ``shape`` that no mesh axis splits yet and that ``size`` divides; ``partition`` itself when
    there is none (or ``size`` is 1)."""
    entries = list(partition) + [None] * (len(shape) - len(partition))
    if size > 1:
        for dim, (entry, length) in enumerate(zip(entries, shape)):
            if entry is None and length % size == 0:
                entries[dim] = axis
                return P(*entries)
    return partition
