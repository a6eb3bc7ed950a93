"""What kernels and collectives achieve on a hardware preset, and how each value was obtained.

:class:`Constants` holds the model's achieved figures. A value is either *sourced* (a datasheet
or a number the paper states) or *fitted*: each fitted value is fitted on exactly one published
number (:data:`FITS` pairs them) by :func:`fit_constants`; every other published number is held
out. ``tests/test_perfmodel.py`` re-fits them and checks the values stored here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

from cpjax.errors import require
from cpjax.hardware import PRESETS as HARDWARE
from cpjax.hardware import Hardware
from cpjax.names import check_choice


@dataclasses.dataclass(frozen=True)
class Constants:
    """Achieved figures of one hardware preset (seconds, bytes/s, fractions of peak).

    Attributes:
      gemm_efficiency: fraction of ``peak_flops`` the linear layers achieve in prefill
        (fitted; the FP8 FFN and bf16 projections together).
      dense_attention_efficiency: fraction of peak an attention tile achieves on keys it sees
        entirely (new queries against cached keys), while all SMs are busy (fitted).
      causal_attention_efficiency: the same for position-masked (causal) attention, the whole
        call averaged (sourced: FA3 causal at 8K, 540 TF/s of 800, paper App. A).
      kernel_launch_s: cost of one kernel launch under CUDA graphs (fitted).
      sendrecv_latency_s, sendrecv_bandwidth: one ring SendRecv costs
        ``latency + bytes / bandwidth`` on the inter-node link (fitted).
      all_to_all_latency_s, all_to_all_bandwidth: one All2All costs
        ``latency + bytes sent per rank / bandwidth`` (fitted).
      ring_step_sync_s: the host synchronisation of one prefill ring step with a transfer
        (prefill runs eagerly, so the host waits for the SendRecv before launching the next
        step; not hidden; decode runs in CUDA graphs and has none) (fitted).
      nvlink_allreduce_latency_s: latency of one all-reduce inside a node (fitted).
      q_tile_rows: query rows of one attention tile (sourced: FA3's 128-row tiles at hdim 128).
      gemm_half_rows: token rows per GPU at which the linear layers reach half their large-M
        rate (efficiency ``gemm_efficiency x M / (M + gemm_half_rows)``). 0 (structural): the
        model bounds small GEMMs by their weight read instead; a non-zero value adds the same
        time to every prefill layer, and no value both fits Table 4's small-T cells and keeps
        Table 6's 8K TTFTs within 15 % (README, ``tests/test_perfmodel.py``).
      decode_kernels_per_layer: kernels of a decode layer besides attention and collectives
        (structural: 2 RMSNorm, QKV, RoPE, KV append, O, gate-up, SwiGLU, down).
    """

    gemm_efficiency: float
    dense_attention_efficiency: float
    causal_attention_efficiency: float
    kernel_launch_s: float
    sendrecv_latency_s: float
    sendrecv_bandwidth: float
    all_to_all_latency_s: float
    all_to_all_bandwidth: float
    ring_step_sync_s: float
    nvlink_allreduce_latency_s: float
    q_tile_rows: int = 128
    gemm_half_rows: float = 0.0
    decode_kernels_per_layer: int = 9

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            require(value >= 0, f"Constants: {field.name}={value!r} must be >= 0")
        for field in ("gemm_efficiency", "dense_attention_efficiency"):
            value = getattr(self, field)
            require(0 < value <= 1, f"Constants: {field}={value!r} must be in (0, 1]")


#: The paper's H100 cluster over RDMA. The fitted values are :func:`fit_constants` of
#: :data:`cpjax.perfmodel.fits.FITS` (each on one published number), rounded to 4 digits.
PAPER_H100_RDMA = Constants(
    gemm_efficiency=0.7699,
    dense_attention_efficiency=0.8161,
    causal_attention_efficiency=540e12 / 800e12,
    kernel_launch_s=3.855e-6,
    sendrecv_latency_s=32.15e-6,
    sendrecv_bandwidth=27.79e9,
    all_to_all_latency_s=81.00e-6,
    all_to_all_bandwidth=42.39e9,
    ring_step_sync_s=0.6621e-3,
    nvlink_allreduce_latency_s=49.51e-6,
)

#: The paper measured about 3 GB/s per rank over TCP (§4.2.1, Fig. 6b); no latency was
#: published, so the RDMA-fitted latencies are kept (an assumption).
TCP_ACHIEVED_BANDWIDTH = 3e9


def constants_for(hardware: Hardware) -> Constants:
    """The achieved figures for a preset of :data:`cpjax.hardware.PRESETS`.

    ``h100-tcp`` is the RDMA fit with the paper's measured TCP bandwidth; ``h100-nvlink`` (a
    stock H100 node whose ring runs over NVLink) keeps the fitted kernel efficiencies and
    latencies and moves bytes at the NVLink line rate (no measurement of it exists here).
    """
    check_choice("hardware preset for the performance model", hardware.name, tuple(HARDWARE))
    if hardware.name == "h100-tcp":
        return dataclasses.replace(
            PAPER_H100_RDMA,
            sendrecv_bandwidth=TCP_ACHIEVED_BANDWIDTH,
            all_to_all_bandwidth=TCP_ACHIEVED_BANDWIDTH,
        )
    if hardware.name == "h100-nvlink":
        return dataclasses.replace(
            PAPER_H100_RDMA,
            sendrecv_bandwidth=hardware.link_bandwidth,
            all_to_all_bandwidth=hardware.link_bandwidth,
        )
    return PAPER_H100_RDMA


class Fit(NamedTuple):
    """One fitted constant and the one published number it is fitted on.

    ``predict(constants)`` is the model's value for that number (in ``unit``); it is monotonic
    in the constant over ``bracket``.
    """

    constant: str
    published: float
    unit: str
    source: str
    predict: Callable[[Constants], float]
    bracket: tuple[float, float]


def _solve(fit: Fit, constants: Constants) -> Constants:
    """``constants`` with ``fit.constant`` set so that the prediction equals the published
    number (bisection over ``fit.bracket``, geometric when the bracket spans decades)."""
    lo, hi = fit.bracket

    def error(value: float) -> float:
        return fit.predict(dataclasses.replace(constants, **{fit.constant: value})) - fit.published

    sign_lo, sign_hi = error(lo) > 0, error(hi) > 0
    require(
        sign_lo != sign_hi,
        f"fit of {fit.constant} on {fit.source}: no value in {fit.bracket} reproduces "
        f"{fit.published} {fit.unit}",
    )
    geometric = lo > 0 and hi / lo > 100
    for _ in range(100):
        mid = math.sqrt(lo * hi) if geometric else (lo + hi) / 2
        if (error(mid) > 0) == sign_lo:
            lo = mid
        else:
            hi = mid
    return dataclasses.replace(constants, **{fit.constant: (lo + hi) / 2})


def fit_constants(fits, start: Constants, sweeps: int = 20) -> Constants:
    """Fit every constant of ``fits`` on its one published number, starting from ``start``.

    Constants interact (a SendRecv's latency and bandwidth both shape every transfer), so the
    fits are repeated in order until none moves (Gauss-Seidel; ``sweeps`` at most).
    """
    constants = start
    for _ in range(sweeps):
        before = constants
        for fit in fits:
            constants = _solve(fit, constants)
        if all(
            math.isclose(getattr(before, f.constant), getattr(constants, f.constant), rel_tol=1e-9)
            for f in fits
        ):
            break
    return constants
