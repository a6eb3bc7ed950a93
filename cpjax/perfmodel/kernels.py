"""Time of one kernel call on one GPU (seconds): GEMMs, prefill attention, decode attention.

Linear layers are a roofline: their FLOPs at the achieved GEMM rate or their weights read from
HBM, whichever is longer (:func:`linear_time`).

Attention efficiency depends on the work in one call: a call runs ``tiles`` tiles of
``q_tile_rows`` query rows x one head on ``sm_count`` SMs, in ``ceil(tiles / sm_count)`` waves.
Tiles against keys they see entirely (dense) all take the same time, so a call of 112 tiles on
132 SMs takes as long as one of 132, and one of 133 as long as one of 264. Position-masked
(causal) tiles vary in length and the kernel balances them; they are counted at the kernel's
whole-call causal rate. Decode attention (Flash-Decoding: a split-K kernel and a combine) is
bound by reading the KV cache.
"""

from __future__ import annotations

import math

from cpjax.hardware import Hardware
from cpjax.perfmodel.calibration import Constants


def gemm_time(flops: float, hardware: Hardware, constants: Constants) -> float:
    """Linear layers: ``flops`` at the achieved (large-M) GEMM rate."""
    return flops / (hardware.peak_flops * constants.gemm_efficiency)


def linear_time(
    flops: float, rows: int, weight_bytes: float, hardware: Hardware, constants: Constants
) -> float:
    """One layer's linear layers on one GPU: ``flops`` over ``rows`` token rows, against
    ``weight_bytes`` of weights, whichever bound is longer (a roofline):

    * compute: ``flops`` at the achieved GEMM rate, scaled by ``rows / (rows +
      gemm_half_rows)`` (a GEMM of few rows is less efficient; ``gemm_half_rows = 0``, the
      shipped value, is no such loss — see :class:`~cpjax.perfmodel.calibration.Constants`);
    * memory: every weight read once from HBM (what bounds decode, and prefill GEMMs of very
      few rows: below ``peak x efficiency x bytes per weight / (2 x HBM bandwidth)`` rows,
      ~128 for the paper's FP8 FFN, ~257 for its bf16 projections).
    """
    compute = 0.0
    if flops > 0:
        compute = gemm_time(flops, hardware, constants) * (1 + constants.gemm_half_rows / rows)
    return max(compute, weight_bytes / hardware.memory_bandwidth)


def attention_tiles(q_rows: int, chunks: int, heads: int, constants: Constants) -> int:
    """Tiles of one attention call over ``q_rows`` query rows split into ``chunks`` contiguous
    pieces (the 2N-chunk layout gives a rank 2), for ``heads`` query heads."""
    per_chunk = math.ceil(q_rows / chunks)
    return chunks * math.ceil(per_chunk / constants.q_tile_rows) * heads


def dense_attention_time(
    q_rows: int, keys: int, chunks: int, heads: int, head_dim: int, hardware, constants
) -> float:
    """Queries against ``keys`` keys each sees entirely (no launch cost): waves x tile time."""
    if q_rows == 0 or keys == 0:
        return 0.0
    tiles = attention_tiles(q_rows, chunks, heads, constants)
    waves = math.ceil(tiles / hardware.sm_count)
    sm_flops = hardware.peak_flops * constants.dense_attention_efficiency / hardware.sm_count
    return waves * 4 * constants.q_tile_rows * keys * head_dim / sm_flops


def causal_attention_time(flops: float, hardware: Hardware, constants: Constants) -> float:
    """Position-masked attention of ``flops`` visible FLOPs (no launch cost)."""
    return flops / (hardware.peak_flops * constants.causal_attention_efficiency)


def decode_attention_time(kv_bytes: float, hardware: Hardware, constants: Constants) -> float:
    """One Flash-Decoding call reading ``kv_bytes`` of cache: two launches + the HBM read."""
    return 2 * constants.kernel_launch_s + kv_bytes / hardware.memory_bandwidth
