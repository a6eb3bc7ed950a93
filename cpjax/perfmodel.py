"""Analytical model of prefill and decode time under context parallelism (paper §3, App. A).

A request of ``T`` new tokens after ``P`` cached ones runs on ``N`` context-parallel nodes, each
with ``tp`` GPUs doing tensor parallelism (heads and FFN columns split ``tp`` ways; a KV head is
replicated when ``tp > n_kv_heads``). Per transformer layer and per GPU:

* compute: linear layers ``2 W_layer T`` plus attention ``4 T (P + T/2) Hq Dh`` FLOPs (causal
  half on the new tokens, every cached key visible), divided over ``N * tp`` GPUs, at
  ``efficiency * peak_flops``; the 2N-chunk layout balances it, so no rank waits;
* tensor parallelism: two all-reduces of the rank's ``T/N x D`` activations over NVLink
  (``2 (tp-1)/tp`` of the bytes each), not overlapped;
* the ring: ``N - 1`` steps, each sending the bytes of ``cpjax.parallel.comm`` (the formula the
  compiled HLO is checked against) while one step's attention runs; only the excess is exposed.
  pass-Q adds its final all-to-all, all-gather its whole gather (neither overlapped).

Decode (one token per sequence): every GPU reads its share of the weights and of the KV cache
from HBM once per token; the model reports that memory time (a lower bound).

One constant per hardware preset is fitted: ``efficiency``, the fraction of peak FLOP/s the
GEMM and attention kernels achieve, fitted on one paper data point only (Table 6: Llama3-405B,
128K tokens on one TP8 node, 42.01 s) by :func:`fit_efficiency`.
"""

from __future__ import annotations

import dataclasses
import math

from cpjax.config import ModelConfig
from cpjax.errors import require
from cpjax.hardware import Hardware
from cpjax.model.decoder import param_count
from cpjax.names import STRATEGIES, check_choice
from cpjax.parallel.comm import formula_bytes_per_layer
from cpjax.parallel.heuristic import choose_strategy


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Where a request runs: ``cp`` nodes of ``tp`` GPUs; ``bytes_per_element`` of attention
    activations and KV (2 for bf16)."""

    cp: int = 1
    tp: int = 8
    bytes_per_element: int = 2

    def __post_init__(self):
        require(self.cp >= 1 and self.tp >= 1, f"cp={self.cp}, tp={self.tp}: must be >= 1")


def linear_params_per_layer(config: ModelConfig) -> int:
    """Weights of one block's matmuls (Q, K, V, O projections and the SwiGLU MLP)."""
    d, hd = config.dim, config.head_dim
    return d * hd * (2 * config.n_heads + 2 * config.n_kv_heads) + 3 * d * config.ffn_dim


def prefill_flops(config: ModelConfig, new_tokens: int, cached_tokens: int = 0) -> dict:
    """FLOPs of a prefill (all layers): ``{"linear", "attention", "total"}``."""
    t, p = new_tokens, cached_tokens
    linear = 2 * linear_params_per_layer(config) * t * config.n_layers
    attention = 4 * t * (p + t / 2) * config.n_heads * config.head_dim * config.n_layers
    return {"linear": linear, "attention": attention, "total": linear + attention}


def _heads_per_gpu(config: ModelConfig, tp: int) -> tuple[int, int]:
    return max(1, config.n_heads // tp), max(1, config.n_kv_heads // tp)


def ring_bytes_per_layer(
    strategy: str, config: ModelConfig, new_tokens: int, cached_tokens: int, deployment: Deployment
) -> int:
    """Bytes one GPU sends per layer in the context-parallel ring (``cpjax.parallel.comm``)."""
    n = deployment.cp
    hq, hkv = _heads_per_gpu(config, deployment.tp)
    tq = math.ceil(new_tokens / n)
    tk = math.ceil((new_tokens + cached_tokens) / n)
    return formula_bytes_per_layer(
        strategy, n, tq, tk, hq, hkv, config.head_dim, deployment.bytes_per_element
    )


def prefill_time(
    config: ModelConfig,
    new_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    cached_tokens: int = 0,
    strategy: str = "auto",
) -> dict:
    """Predicted TTFT of a prefill and its breakdown (seconds, bytes, utilisation)."""
    require(new_tokens >= 1, f"new_tokens={new_tokens}: must be >= 1")
    require(cached_tokens >= 0, f"cached_tokens={cached_tokens}: must be >= 0")
    n, tp, e = deployment.cp, deployment.tp, deployment.bytes_per_element
    if strategy == "auto":
        strategy = choose_strategy(
            new_tokens, cached_tokens, config, n, hardware, bytes_per_element=e
        )
    check_choice("context-parallel strategy", strategy, STRATEGIES)
    gpus = n * tp
    achieved = hardware.efficiency * hardware.peak_flops
    flops = prefill_flops(config, new_tokens, cached_tokens)
    layers = config.n_layers
    compute = flops["total"] / gpus / achieved  # whole model, per GPU
    activation_bytes = math.ceil(new_tokens / n) * config.dim * e
    tp_comm = (
        layers * 2 * 2 * (tp - 1) / tp * activation_bytes / hardware.nvlink_bandwidth
        if tp > 1
        else 0.0
    )
    ring_bytes = ring_bytes_per_layer(strategy, config, new_tokens, cached_tokens, deployment)
    exposed = 0.0
    if n > 1:
        step_attention = flops["attention"] / layers / gpus / n / achieved
        hq, _ = _heads_per_gpu(config, tp)
        tq = math.ceil(new_tokens / n)
        all_to_all = (n - 1) * tq * hq * (config.head_dim * e + 4) if strategy == "pass_q" else 0
        if strategy == "all_gather":
            exposed = ring_bytes / hardware.link_bandwidth
        else:
            step_bytes = (ring_bytes - all_to_all) / (n - 1)
            exposed = (n - 1) * max(
                0.0, step_bytes / hardware.link_bandwidth - step_attention
            ) + all_to_all / hardware.link_bandwidth
        exposed *= layers
    ttft = compute + tp_comm + exposed
    return {
        "ttft_s": ttft,
        "compute_s": compute,
        "tp_allreduce_s": tp_comm,
        "exposed_ring_s": exposed,
        "strategy": strategy,
        "flops": flops["total"],
        "flop_utilization": flops["total"] / gpus / ttft / hardware.peak_flops,
        "ring_bytes_per_gpu_per_layer": ring_bytes,
        "ring_bytes_per_gpu": ring_bytes * layers,
    }


def decode_time(
    config: ModelConfig,
    context_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    weight_bytes_per_param: float = 2.0,
    batch: int = 1,
) -> dict:
    """Memory-bound time per decoded token: each GPU reads its weight share and KV share."""
    n, tp, e = deployment.cp, deployment.tp, deployment.bytes_per_element
    _, hkv = _heads_per_gpu(config, tp)
    weights = param_count(config) * weight_bytes_per_param / tp
    kv = 2 * math.ceil(context_tokens / n) * hkv * config.head_dim * e * config.n_layers * batch
    return {
        "tpot_s": (weights + kv) / hardware.memory_bandwidth,
        "weight_bytes_per_gpu": weights,
        "kv_bytes_per_gpu": kv,
    }


def fit_efficiency(
    config: ModelConfig,
    new_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    measured_ttft_s: float,
) -> float:
    """The ``efficiency`` at which :func:`prefill_time` gives ``measured_ttft_s`` (bisection)."""
    lo, hi = 1e-3, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        hw = dataclasses.replace(hardware, efficiency=mid)
        if prefill_time(config, new_tokens, deployment, hw)["ttft_s"] > measured_ttft_s:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
