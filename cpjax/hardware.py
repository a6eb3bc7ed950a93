"""Hardware figures that decide whether communication hides behind compute.

A :class:`Hardware` holds per-device figures, each from a datasheet or the paper: peak FLOP/s
of the attention/matmul dtype, the line rate of the link the context-parallel ring uses
(bytes/s, one direction), memory bandwidth and capacity, NVLink bandwidth and SM count.
Presets follow the paper's machines (§4.1: power-limited H100 at 800 TF/s bf16, 96 GB HBM2e at
2.4 TB/s; RDMA 400 Gb/s and TCP 100 Gb/s per GPU) plus a stock H100 SXM over NVLink (NVIDIA
datasheet: 989 TF/s dense bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 4 at 900 GB/s both directions,
132 SMs). What kernels and collectives *achieve* on them is fitted in ``cpjax.perfmodel``.
:func:`calibrate_cpu` measures the fake-CPU-device mesh this process runs on.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from cpjax.errors import require
from cpjax.names import HARDWARE_PRESETS, check_choice


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Per-device figures.

    Attributes:
      name: preset name.
      peak_flops: FLOP/s of one device (C in the paper).
      link_bandwidth: bytes/s one device sends to its ring neighbour (BW in the paper).
      memory_bandwidth: bytes/s of the device memory (decode is bound by it).
      nvlink_bandwidth: bytes/s per GPU and direction inside a node (tensor-parallel
        all-reduces); NVLink 4 moves 900 GB/s both directions, 450 GB/s each.
      memory_bytes: device memory capacity in bytes.
      sm_count: streaming multiprocessors (an attention kernel call with fewer tiles than SMs
        leaves some idle).
    """

    name: str
    peak_flops: float
    link_bandwidth: float
    memory_bandwidth: float
    nvlink_bandwidth: float = 450e9
    memory_bytes: float = 80e9
    sm_count: int = 132

    def __post_init__(self):
        fields = ("peak_flops", "link_bandwidth", "memory_bandwidth", "nvlink_bandwidth")
        for field in (*fields, "memory_bytes", "sm_count"):
            value = getattr(self, field)
            require(value > 0, f"Hardware {self.name!r}: {field}={value!r} must be > 0")


PRESETS = {
    # The paper's GTT cluster: power-limited H100 (800 TF/s bf16, 96 GB at 2.4 TB/s), RDMA
    # 400 Gb/s per GPU.
    "h100-rdma": Hardware("h100-rdma", 800e12, 400e9 / 8, 2.4e12, memory_bytes=96e9),
    # The paper's GTI cluster: same GPUs over the TCP frontend network, 100 Gb/s per GPU.
    "h100-tcp": Hardware("h100-tcp", 800e12, 100e9 / 8, 2.4e12, memory_bytes=96e9),
    # A stock H100 SXM node: 989 TF/s dense bf16, 80 GB at 3.35 TB/s, the ring over NVLink 4.
    "h100-nvlink": Hardware("h100-nvlink", 989e12, 450e9, 3.35e12),
}


def get_hardware(name: str) -> Hardware:
    """A preset by name, or ``"cpu"`` for a measurement of this machine's fake devices."""
    check_choice("hardware", name, HARDWARE_PRESETS)
    return calibrate_cpu() if name == "cpu" else PRESETS[name]


def _best_time(fn, *args, repeats: int = 3) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def calibrate_cpu(matmul_size: int = 512, message_floats: int = 1 << 20) -> Hardware:
    """Measure fp32 matmul FLOP/s on one device and the ring ``ppermute`` bandwidth over all
    local devices (fake CPU devices share memory, so the "link" is a copy). Takes ~1 s; cached.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    a = jnp.ones((matmul_size, matmul_size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    flops = 2 * matmul_size**3 / _best_time(matmul, a)

    devices = jax.devices()
    n = len(devices)
    if n == 1:
        bandwidth = 4 * message_floats / _best_time(jax.jit(lambda x: x + 0), a.ravel())
    else:
        mesh = jax.sharding.Mesh(np.array(devices), ("ring",))
        perm = [(i, (i + 1) % n) for i in range(n)]
        shift = jax.jit(
            jax.shard_map(
                lambda x: jax.lax.ppermute(x, "ring", perm),
                mesh=mesh,
                in_specs=P("ring"),
                out_specs=P("ring"),
            )
        )
        x = jnp.ones((n * message_floats,), jnp.float32)
        bandwidth = 4 * message_floats / _best_time(shift, x)
    return Hardware("cpu", flops, bandwidth, bandwidth)
