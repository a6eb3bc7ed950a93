"""Device meshes with a ``context`` axis (sequence sharding) and a ``tensor`` axis (heads/FFN)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from cpjax.errors import require
from cpjax.xla_env import fake_cpu_device_flags

CONTEXT = "context"
TENSOR = "tensor"


def use_fake_cpu_devices(count: int) -> None:
    """Ask XLA for ``count`` host (CPU) devices. Must run before jax initialises its backend."""
    require(count >= 1, f"fake device count {count}: must be >= 1")
    os.environ["XLA_FLAGS"] = fake_cpu_device_flags(os.environ.get("XLA_FLAGS", ""), count)


def make_mesh(context: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(context, tensor)`` mesh over the first ``context * tensor`` devices.

    The ``tensor`` axis is the fast (innermost) one, as TP inside a node and CP across nodes.
    Axis types are Auto: cpjax places data with explicit ``NamedSharding``s and ``shard_map``.
    """
    require(isinstance(context, int) and context >= 1, f"context={context!r}: must be an int >= 1")
    require(isinstance(tensor, int) and tensor >= 1, f"tensor={tensor!r}: must be an int >= 1")
    devices = jax.devices() if devices is None else list(devices)
    need = context * tensor
    require(
        need <= len(devices),
        f"mesh context={context} x tensor={tensor} needs {need} devices, but only "
        f"{len(devices)} are available (on CPU, simulate more with --fake-devices {need})",
    )
    require(
        len(devices) % need == 0,
        f"mesh context={context} x tensor={tensor} = {need} devices does not divide the "
        f"{len(devices)} available devices",
    )
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(
        (context, tensor), (CONTEXT, TENSOR), axis_types=auto, devices=devices[:need]
    )


@dataclasses.dataclass(frozen=True)
class Ranks:
    """The ranks of the ``context`` axis as one rank's program sees them.

    ``axis=None`` is a single rank without collectives (plain ``jit``, no ``shard_map``), so the
    same step body serves one device and a mesh.
    """

    axis: Optional[str]
    size: int

    def index(self):
        """This rank's index (int32 scalar; 0 without an axis)."""
        return jnp.int32(0) if self.axis is None else jax.lax.axis_index(self.axis)

    def all_gather(self, x, tiled: bool = False):
        """Every rank's ``x``: ``[N, ...]`` (``tiled``: concatenated along axis 0)."""
        if self.axis is None:
            return x if tiled else x[None]
        return jax.lax.all_gather(x, self.axis, tiled=tiled)

    def sum(self, x):
        """``x`` summed over the ranks (``x`` itself without an axis)."""
        return x if self.axis is None else jax.lax.psum(x, self.axis)


SINGLE_RANK = Ranks(axis=None, size=1)
