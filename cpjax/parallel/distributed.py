"""Multi-process (multi-host) JAX: start-up, the global mesh, feeding and fetching global arrays.

One mesh can span several processes (hosts): every process runs the same program on the same
inputs; jax's own distributed runtime (``jax.distributed``) connects them, and collectives go over
NCCL on GPUs or gloo on CPUs. Nothing here is a transport of its own.

* :func:`initialize` starts the runtime from a :class:`ProcessGroup` (built from arguments or
  from the environment, :func:`process_group_from_env`): ``CPJAX_COORDINATOR`` /
  ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``CPJAX_NUM_PROCESSES`` /
  ``JAX_NUM_PROCESSES`` and ``CPJAX_PROCESS_ID`` / ``JAX_PROCESS_ID``.
* :func:`global_mesh` is a ``(context, tensor)`` mesh over every process's devices with the
  ``tensor`` axis inside a process (TP inside a host) and ``context`` across them (CP across
  hosts), as in the paper.
* :func:`put` builds a global array from a host value that every process holds, each process
  transferring only the shards its own devices hold; :func:`fetch` returns the global value of
  an array on every process (an all-gather across processes when its shards are spread).

In a single process these are plain ``device_put`` / ``np.asarray``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from cpjax.errors import CpjaxError, require

#: Environment variables read by :func:`process_group_from_env` (cpjax's, then jax's names).
ENV_NAMES = {
    "coordinator": ("CPJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("CPJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("CPJAX_PROCESS_ID", "JAX_PROCESS_ID"),
}
#: Optional: seconds without heartbeats after which a process counts as dead.
ENV_HEARTBEAT = "CPJAX_HEARTBEAT_TIMEOUT_S"


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a multi-process run.

    Attributes:
      coordinator: ``host:port`` of process 0's coordination service (all processes agree).
      num_processes: P, processes in the run.
      process_id: this process, ``0 <= process_id < P``.
      heartbeat_timeout_s: a process silent this long is declared dead and every other process
        exits with an error (instead of waiting forever in a collective).
      initialization_timeout_s: how long start-up waits for all processes to connect.
    """

    coordinator: str
    num_processes: int
    process_id: int
    heartbeat_timeout_s: int = 20
    initialization_timeout_s: int = 120

    def __post_init__(self):
        host, _, port = self.coordinator.rpartition(":")
        require(
            host != "" and port.isdigit() and 0 < int(port) < 65536,
            f"coordinator={self.coordinator!r}: expected host:port, e.g. 10.0.0.1:1234",
        )
        require(
            isinstance(self.num_processes, int) and self.num_processes >= 1,
            f"num_processes={self.num_processes!r}: must be an int >= 1",
        )
        require(
            isinstance(self.process_id, int) and 0 <= self.process_id < self.num_processes,
            f"process_id={self.process_id!r}: must be in [0, num_processes={self.num_processes})",
        )
        for name in ("heartbeat_timeout_s", "initialization_timeout_s"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name}={value!r}: must be >= 1")


def _env(field: str, environ) -> str | None:
    for name in ENV_NAMES[field]:
        if environ.get(name, "") != "":
            return environ[name]
    return None


def process_group_from_env(environ=None) -> ProcessGroup | None:
    """The :class:`ProcessGroup` the environment describes, or ``None`` if it names none.

    All three values must be set together; integers must parse (a clear error otherwise).
    ``CPJAX_HEARTBEAT_TIMEOUT_S`` optionally overrides the heartbeat timeout.
    """
    environ = os.environ if environ is None else environ
    values = {field: _env(field, environ) for field in ENV_NAMES}
    if all(v is None for v in values.values()):
        return None
    missing = [ENV_NAMES[f][0] for f, v in values.items() if v is None]
    require(
        not missing,
        f"multi-process environment incomplete: {', '.join(missing)} not set "
        f"(set {', '.join(n[0] for n in ENV_NAMES.values())} together)",
    )
    texts = {ENV_NAMES[f][0]: (f, values[f]) for f in ("num_processes", "process_id")}
    if environ.get(ENV_HEARTBEAT, "") != "":
        texts[ENV_HEARTBEAT] = ("heartbeat_timeout_s", environ[ENV_HEARTBEAT])
    numbers = {}
    for name, (field, text) in texts.items():
        try:
            numbers[field] = int(text)
        except ValueError:
            raise CpjaxError(f"{name}={text!r}: not an integer") from None
    return ProcessGroup(values["coordinator"], **numbers)


def initialize(group: ProcessGroup) -> None:
    """Start jax's distributed runtime for ``group`` (before any other jax work).

    On CPU the cross-process collectives use gloo. A single-process group starts nothing.
    """
    if group.num_processes == 1:
        return
    require(
        not jax.distributed.is_initialized(),
        "jax.distributed is already initialized in this process",
    )
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms in ("", "cpu") or platforms.startswith("cpu"):
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, KeyError, ValueError):
            pass  # a jax without the option chooses its CPU collectives itself
    try:
        jax.distributed.initialize(
            coordinator_address=group.coordinator,
            num_processes=group.num_processes,
            process_id=group.process_id,
            initialization_timeout=group.initialization_timeout_s,
            heartbeat_timeout_seconds=group.heartbeat_timeout_s,
        )
    except RuntimeError as exc:
        raise CpjaxError(
            f"could not start process {group.process_id} of "
            f"{group.num_processes} with coordinator {group.coordinator}: "
            f"{exc}"
        ) from None


def is_main_process() -> bool:
    """True on process 0 (the one that prints and writes files)."""
    return jax.process_index() == 0


def global_mesh(context: int, tensor: int = 1):
    """A ``(context, tensor)`` mesh over all devices of all processes.

    ``tensor`` must divide each process's device count (tensor parallelism stays inside a
    host, on its fast links) and ``context * tensor`` must use every device, so that the
    ``context`` axis spans the processes (ring steps between hosts).
    """
    from cpjax.parallel.mesh import make_mesh

    local, total = jax.local_device_count(), jax.device_count()
    require(
        isinstance(tensor, int) and tensor >= 1 and local % tensor == 0,
        f"tensor={tensor!r}: must divide the {local} devices of each process (tensor "
        f"parallelism stays inside a host)",
    )
    require(
        isinstance(context, int) and context * tensor == total,
        f"context={context!r} x tensor={tensor}: must use all {total} devices of the "
        f"{jax.process_count()} processes (context = {total // tensor})",
    )
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return make_mesh(context, tensor, devices)


def put(value, sharding, dtype=None) -> jax.Array:
    """The global array of ``value`` laid out by ``sharding`` (cast to ``dtype`` if given).

    A host value (the same on every process) is copied shard by shard, each process copying
    only the shards its devices hold; a jax array already on the mesh is resharded on device
    (never gathered onto one host).
    """
    if isinstance(value, jax.Array):
        value = value if dtype is None or value.dtype == dtype else value.astype(dtype)
        return value if value.sharding == sharding else jax.device_put(value, sharding)
    value = np.asarray(value)
    if dtype is not None:
        value = value.astype(dtype, copy=False)
    if getattr(sharding, "is_fully_addressable", True):
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def fetch(array) -> np.ndarray:
    """The whole value of ``array`` as a numpy array, on every process."""
    if not isinstance(array, jax.Array) or array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
