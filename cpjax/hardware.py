"""Hardware figures that decide whether communication hides behind compute.

A :class:`Hardware` holds per-device numbers: peak FLOP/s of the attention/matmul dtype, the
bandwidth of the link the context-parallel ring uses (bytes/s, one direction), and memory
bandwidth. Presets follow the paper's machines (power-limited H100 at 800 TF/s bf16, 2.4 TB/s
HBM; RDMA 400 Gb/s and TCP 100 Gb/s per GPU) plus a stock H100 SXM over NVLink.
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
      nvlink_bandwidth: bytes/s per GPU inside a node (tensor-parallel all-reduces).
      efficiency: fraction of ``peak_flops`` the GEMM/attention kernels achieve (the one
        constant ``cpjax.perfmodel`` fits per preset).
    """

    name: str
    peak_flops: float
    link_bandwidth: float
    memory_bandwidth: float
    nvlink_bandwidth: float = 450e9
    efficiency: float = 1.0

    def __post_init__(self):
        require(
            0 < self.efficiency <= 1,
            f"Hardware {self.name!r}: efficiency={self.efficiency!r} must be in (0, 1]",
        )
        for field in ("peak_flops", "link_bandwidth", "memory_bandwidth", "nvlink_bandwidth"):
            value = getattr(self, field)
            require(value > 0, f"Hardware {self.name!r}: {field}={value!r} must be > 0")


#: Fitted by ``cpjax.perfmodel.fit_efficiency`` on one point, the paper's Table 6 (Llama3-405B,
#: 128K tokens, one TP8 node: 42.01 s); ``tests/test_perfmodel.py`` re-fits and checks it.
PAPER_H100_EFFICIENCY = 0.7284

PRESETS = {
    # The paper's GTT cluster: power-limited H100 (800 TF/s bf16), RDMA 400 Gb/s per GPU.
    "h100-rdma": Hardware("h100-rdma", 800e12, 400e9 / 8, 2.4e12, efficiency=PAPER_H100_EFFICIENCY),
    # The paper's GTI cluster: same GPUs over the TCP frontend network, 100 Gb/s per GPU.
    "h100-tcp": Hardware("h100-tcp", 800e12, 100e9 / 8, 2.4e12, efficiency=PAPER_H100_EFFICIENCY),
    # A stock H100 SXM node: 989 TF/s dense bf16, NVLink 4 at 450 GB/s per direction
    # (efficiency not fitted: no measurement of it here).
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
