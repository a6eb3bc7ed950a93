"""The one table that maps logical array axes to mesh axes.

Models name the axes of their arrays (``q_heads``, ``ffn``, ``sequence`` ...); this table says
which mesh axis shards each. Changing the parallel layout means editing :data:`RULES`, not the
model.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from cpjax.parallel.mesh import CONTEXT, TENSOR

RULES: dict[str, str] = {
    "sequence": CONTEXT,   # tokens of the packed row, in load-balanced layout order
    "q_heads": TENSOR,
    "kv_heads": TENSOR,
    "ffn": TENSOR,
}


def spec(logical_axes: tuple) -> P:
    """PartitionSpec of an array whose axes carry ``logical_axes`` (None = replicated axis)."""
    return P(*(RULES.get(a) for a in logical_axes))


def tree_specs(axes_tree, like):
    """PartitionSpecs for the leaves of ``like``, from the matching entries of ``axes_tree``."""
    def lookup(path, _):
        node = axes_tree
        for key in path:
            node = node[key.key]
        return spec(node)
    return jax.tree_util.tree_map_with_path(lookup, like)
