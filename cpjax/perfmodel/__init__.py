"""Analytical performance model of context-parallel inference (paper §3-4, Tables 4-8).

* :mod:`~cpjax.perfmodel.prefill` — TTFT per ring step (pass-KV, pass-Q, all-gather);
* :mod:`~cpjax.perfmodel.decode` — TTIT (ring pass-Q and all-reduce decode);
* :mod:`~cpjax.perfmodel.memory` — bytes per GPU against the device's memory;
* :mod:`~cpjax.perfmodel.planner` — the smallest CP x TP mesh meeting a TTFT target;
* :mod:`~cpjax.perfmodel.collectives`, :mod:`~cpjax.perfmodel.kernels` — the cost of one
  collective (latency + bytes / bandwidth) and of one kernel call;
* :mod:`~cpjax.perfmodel.calibration`, :mod:`~cpjax.perfmodel.fits` — every constant, sourced
  or fitted on exactly one published number (:mod:`~cpjax.perfmodel.paper`).
"""

from cpjax.perfmodel.calibration import Constants, constants_for, fit_constants
from cpjax.perfmodel.decode import decode_time, fastest_decode
from cpjax.perfmodel.memory import memory_per_gpu
from cpjax.perfmodel.planner import plan
from cpjax.perfmodel.prefill import (
    Deployment,
    fastest_strategy,
    prefill_flops,
    prefill_time,
    ring_bytes_per_layer,
)

__all__ = [
    "Constants",
    "Deployment",
    "constants_for",
    "decode_time",
    "fastest_decode",
    "fastest_strategy",
    "fit_constants",
    "memory_per_gpu",
    "plan",
    "prefill_flops",
    "prefill_time",
    "ring_bytes_per_layer",
]
