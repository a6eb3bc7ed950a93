"""Time per decoded token (TTIT) under context parallelism (paper §3.6, §4.3, Tables 6-8).

Each layer, on one GPU, for ``B`` sequences of ``C`` cached tokens on ``N`` ranks of ``tp``:

* linear layers read the GPU's share of the weights from HBM (decode is memory bound), plus
  ``decode_kernels_per_layer`` kernel launches and two tensor-parallel all-reduces of the
  tokens' activations (latency bound);
* ``ring_pass_q`` (the paper's Algorithm 4): the query count is padded to a multiple of N, so
  each rank carries ``q = ceil(B/N)`` queries; N steps each run one Flash-Decoding call over
  the ``q`` sequences' local cache (``ceil(C/N)`` tokens each) while the queries' SendRecv to
  the next rank runs (``max`` per step), then one All2All returns the partial outputs;
* ``allreduce``: every rank attends all B queries to its local cache in one call, then the
  partial outputs and LSEs (fp32) are all-reduced across the N ranks.

Plus the output head once per token. Decode runs in CUDA graphs (paper §4.1): no per-step
host synchronisation.
"""

from __future__ import annotations

import math

from cpjax.config import ModelConfig
from cpjax.errors import require
from cpjax.hardware import Hardware
from cpjax.names import DECODE_STRATEGIES, check_choice
from cpjax.perfmodel.calibration import Constants, constants_for
from cpjax.perfmodel.collectives import all_reduce_time, all_to_all_time, sendrecv_time
from cpjax.perfmodel.kernels import decode_attention_time
from cpjax.perfmodel.prefill import (
    Deployment,
    heads_per_gpu,
    linear_layer_time,
)


def output_head_bytes(config: ModelConfig, deployment: Deployment) -> float:
    """Bytes of the output projection (the embedding when tied) and the final norm."""
    return (config.vocab_size + 1) * config.dim * deployment.weight_bytes


def _kv_bytes_per_token(config: ModelConfig, deployment: Deployment) -> int:
    """Bytes of one token's K and V for one layer on one GPU."""
    _, hkv = heads_per_gpu(config, deployment.tp)
    return 2 * hkv * config.head_dim * deployment.bytes_per_element


def attention_path(
    config: ModelConfig,
    context_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    batch: int,
    strategy: str,
    constants: Constants | None = None,
) -> dict:
    """One layer's attention path on one GPU (seconds): ``attention_op`` (one call),
    ``ring_loop`` (all calls), ``sendrecv`` (all transfers), ``exposed_sendrecv``,
    ``all_to_all``, ``cp_allreduce`` and ``total`` (the critical path). Table 8's quantities."""
    constants = constants_for(hardware) if constants is None else constants
    n = deployment.cp
    hq, _ = heads_per_gpu(config, deployment.tp)
    per_rank_context = math.ceil(context_tokens / n)
    kv_token = _kv_bytes_per_token(config, deployment)
    e = deployment.bytes_per_element
    if strategy == "allreduce" or n == 1:
        op = decode_attention_time(batch * per_rank_context * kv_token, hardware, constants)
        partials = batch * hq * (config.head_dim + 1) * 4
        reduce = all_reduce_time(partials, n, 1, hardware, constants)
        return {
            "attention_op": op,
            "ring_loop": op,
            "sendrecv": 0.0,
            "exposed_sendrecv": 0.0,
            "all_to_all": 0.0,
            "cp_allreduce": reduce,
            "total": op + reduce,
        }
    q = math.ceil(batch / n)
    op = decode_attention_time(q * per_rank_context * kv_token, hardware, constants)
    step = sendrecv_time(q * (hq * config.head_dim * e + 8), constants)
    a2a = all_to_all_time((n - 1) * q * hq * (config.head_dim * e + 4), n, constants)
    exposed = (n - 1) * max(0.0, step - op)
    return {
        "attention_op": op,
        "ring_loop": n * op,
        "sendrecv": (n - 1) * step,
        "exposed_sendrecv": exposed,
        "all_to_all": a2a,
        "cp_allreduce": 0.0,
        "total": n * op + exposed + a2a,
    }


def decode_time(
    config: ModelConfig,
    context_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    batch: int = 1,
    strategy: str = "ring_pass_q",
    constants: Constants | None = None,
) -> dict:
    """Predicted time per decoded token and its components (milliseconds, all layers).

    ``ttit_ms = attention_ms + sendrecv_ms + all_to_all_ms + cp_allreduce_ms + linear_ms +
    tp_allreduce_ms + launch_ms + output_head_ms`` (``sendrecv_ms`` is the exposed part;
    ``sendrecv_total_ms`` all of it). ``per_layer_us`` is :func:`attention_path` in µs.
    """
    require(context_tokens >= 1, f"context_tokens={context_tokens}: must be >= 1")
    require(batch >= 1, f"batch={batch}: must be >= 1")
    check_choice("decode strategy", strategy, DECODE_STRATEGIES)
    c = constants_for(hardware) if constants is None else constants
    n, layers = deployment.cp, config.n_layers
    tokens = math.ceil(batch / n) if strategy == "ring_pass_q" else batch
    path = attention_path(config, context_tokens, deployment, hardware, batch, strategy, c)
    activations = tokens * config.dim * deployment.bytes_per_element
    tp_allreduce = 2 * all_reduce_time(
        activations, deployment.tp, deployment.gpus_per_node, hardware, c
    )
    head = output_head_bytes(config, deployment) / deployment.tp / hardware.memory_bandwidth
    parts_s = {
        "attention_ms": layers * path["ring_loop"],
        "sendrecv_ms": layers * path["exposed_sendrecv"],
        "all_to_all_ms": layers * path["all_to_all"],
        "cp_allreduce_ms": layers * path["cp_allreduce"],
        "linear_ms": layers * linear_layer_time(config, tokens, deployment, hardware, c),
        "tp_allreduce_ms": layers * tp_allreduce,
        "launch_ms": (layers * c.decode_kernels_per_layer + 1) * c.kernel_launch_s,
        "output_head_ms": head,
    }
    parts = {k: 1e3 * v for k, v in parts_s.items()}
    return {
        "ttit_ms": sum(parts.values()),
        **parts,
        "sendrecv_total_ms": 1e3 * layers * path["sendrecv"],
        "strategy": strategy,
        "per_layer_us": {k: 1e6 * v for k, v in path.items()},
    }


def fastest_decode(
    config: ModelConfig,
    context_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    batch: int = 1,
    constants: Constants | None = None,
) -> dict:
    """The :func:`decode_time` of whichever decode strategy the model predicts fastest."""
    predictions = [
        decode_time(config, context_tokens, deployment, hardware, batch, s, constants)
        for s in DECODE_STRATEGIES
    ]
    return min(predictions, key=lambda p: p["ttit_ms"])
