"""Bytes one GPU holds during a prefill, against the device's memory.

Weights (the GPU's ``1/tp`` share; context parallelism does not shard them), the KV cache of
the rank's tokens after the prefill (new tokens in 2N chunks, each padded to whole attention
tiles), one layer's live activations, and the ring's buffers (the block in flight and the one
being used; pass-Q also its N fp32 partial outputs, all-gather every rank's block).
"""

from __future__ import annotations

import math

from cpjax.config import ModelConfig
from cpjax.errors import require
from cpjax.hardware import Hardware
from cpjax.names import STRATEGIES, check_choice
from cpjax.perfmodel.calibration import Constants, constants_for
from cpjax.perfmodel.decode import output_head_bytes
from cpjax.perfmodel.prefill import Deployment, heads_per_gpu, weight_bytes_per_layer


def kv_rows_per_rank(new_tokens: int, cached_tokens: int, n: int, tile: int) -> int:
    """KV rows of one rank after a prefill: its ``ceil(P/N)`` cached rows plus its 2 chunks of
    the new tokens (1 without context parallelism), each padded to a multiple of ``tile``."""
    chunks = 2 if n > 1 else 1
    chunk = math.ceil(new_tokens / (chunks * n))
    return math.ceil(cached_tokens / n) + chunks * math.ceil(chunk / tile) * tile


def memory_per_gpu(
    config: ModelConfig,
    new_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    cached_tokens: int = 0,
    strategy: str = "pass_kv",
    constants: Constants | None = None,
) -> dict:
    """Bytes per GPU: ``weights``, ``kv_cache``, ``activations``, ``ring_buffers``, ``total``,
    the device's ``capacity`` and whether it ``fits``."""
    require(new_tokens >= 1, f"new_tokens={new_tokens}: must be >= 1")
    require(cached_tokens >= 0, f"cached_tokens={cached_tokens}: must be >= 0")
    check_choice("context-parallel strategy", strategy, STRATEGIES)
    c = constants_for(hardware) if constants is None else constants
    n, tp, e = deployment.cp, deployment.tp, deployment.bytes_per_element
    hq, hkv = heads_per_gpu(config, tp)
    dh = config.head_dim
    weights = (
        config.n_layers * weight_bytes_per_layer(config, deployment)
        + output_head_bytes(config, deployment)
        + (0 if config.tie_embeddings else config.vocab_size * config.dim * deployment.weight_bytes)
    ) / tp
    kv_row = 2 * hkv * dh * e
    rows = kv_rows_per_rank(new_tokens, cached_tokens, n, c.q_tile_rows)
    kv_cache = config.n_layers * rows * kv_row
    t = math.ceil(new_tokens / n)
    ffn_per_gpu = math.ceil(config.ffn_dim / tp)
    activations = t * e * (3 * config.dim + 3 * ffn_per_gpu + (hq + 2 * hkv) * dh)
    block = math.ceil((new_tokens + cached_tokens) / n) * (kv_row + 8)
    if n == 1:
        ring = 0
    elif strategy == "pass_kv":
        ring = 2 * block
    elif strategy == "pass_q":
        ring = 2 * t * (hq * dh * e + 8) + n * t * hq * (dh * 4 + 4)
    else:
        ring = n * block
    total = weights + kv_cache + activations + ring
    return {
        "weights": weights,
        "kv_cache": kv_cache,
        "activations": activations,
        "ring_buffers": ring,
        "total": total,
        "capacity": hardware.memory_bytes,
        "fits": total <= hardware.memory_bytes,
    }
