"""XLA environment flags cpjax sets before jax starts its backend (imports no jax)."""

from __future__ import annotations

#: XLA flag every multi-device CPU run needs. On CPU all of a ``shard_map``'s
#: ``collective-permute`` s share one channel id and the runtime meets a collective's
#: participants by (run, channel id), so two permutes running at the same time mix their
#: participants and abort the process ("Check failed: id < num_threads"). The training step's
#: backward (a recomputed forward ring next to the backward ring) is where XLA's
#: concurrency-optimised scheduler first lets two overlap (8 fake devices, pass-KV); without it
#: they stay ordered. (The per-program ``compiler_options`` route does not prevent it.)
CPU_COLLECTIVES_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def fake_cpu_device_flags(xla_flags: str, count: int) -> str:
    """``xla_flags`` asking for ``count`` host (CPU) devices with :data:`CPU_COLLECTIVES_FLAG`."""
    flags = [
        f
        for f in xla_flags.split()
        if not f.startswith("--xla_force_host_platform_device_count")
        and not f.startswith(CPU_COLLECTIVES_FLAG.split("=")[0])
    ]
    return " ".join(
        [*flags, f"--xla_force_host_platform_device_count={count}", CPU_COLLECTIVES_FLAG]
    )
