"""Prefill time under context parallelism (paper §3-4), per ring step.

A request of ``T`` new tokens after ``P`` cached ones runs on ``N = cp`` context-parallel ranks
(nodes), each ``tp`` GPUs of tensor parallelism (heads and FFN columns split ``tp`` ways; a KV
head is replicated when ``tp > n_kv_heads``; ``tp`` above a node's GPUs spans nodes). Per
layer and per GPU, with ``t = ceil(T/N)`` new and ``c = ceil(P/N)`` cached tokens per rank:

* linear layers: ``2 W_layer t / tp`` FLOPs at the achieved GEMM rate or the GPU's share of
  the weights read from HBM, whichever is longer, then two tensor-parallel all-reduces of
  ``t x D`` activations (not overlapped);
* the ring, ``N`` steps: each runs one attention call — the rank's queries against the visiting
  (pass-KV) or local (pass-Q) block: ``c`` cached keys seen entirely (tile waves,
  :mod:`cpjax.perfmodel.kernels`) and ``1/N`` of the rank's causal new-token work — while the
  next block's SendRecv runs: a step costs ``max(attention, SendRecv)``, and each of the
  ``N - 1`` steps with a transfer a synchronisation cost. pass-Q then returns its partial
  outputs with one All2All; all-gather gathers every block first and attends once.

The bytes per step are those of :mod:`cpjax.parallel.comm` (the formula the compiled HLO is
checked against).
"""

from __future__ import annotations

import dataclasses
import math

from cpjax.config import ModelConfig
from cpjax.errors import require
from cpjax.hardware import Hardware
from cpjax.names import STRATEGIES, check_choice
from cpjax.parallel.comm import formula_bytes_per_layer
from cpjax.parallel.heuristic import choose_strategy
from cpjax.perfmodel.calibration import Constants, constants_for
from cpjax.perfmodel.collectives import (
    all_gather_time,
    all_reduce_time,
    all_to_all_time,
    sendrecv_time,
)
from cpjax.perfmodel.kernels import causal_attention_time, dense_attention_time, linear_time


@dataclasses.dataclass(frozen=True)
class Deployment:
    """Where a request runs: ``cp`` context-parallel ranks of ``tp`` GPUs each.

    Attributes:
      cp: context-parallel ranks N (one or more nodes each).
      tp: tensor-parallel GPUs per rank; above ``gpus_per_node`` it spans nodes and must be a
        multiple of it.
      bytes_per_element: bytes of attention activations and KV (2 for bf16).
      gpus_per_node: GPUs in one node (NVLink domain).
      ffn_weight_bytes: bytes per FFN weight (1: the paper's row-wise FP8 FFN).
      weight_bytes: bytes per other weight (attention projections, embeddings, norms).
    """

    cp: int = 1
    tp: int = 8
    bytes_per_element: int = 2
    gpus_per_node: int = 8
    ffn_weight_bytes: float = 1.0
    weight_bytes: float = 2.0

    def __post_init__(self):
        for field in ("cp", "tp", "bytes_per_element", "gpus_per_node"):
            value = getattr(self, field)
            require(
                isinstance(value, int) and value >= 1, f"{field}={value!r}: must be an int >= 1"
            )
        require(
            self.tp <= self.gpus_per_node or self.tp % self.gpus_per_node == 0,
            f"tp={self.tp}: above gpus_per_node={self.gpus_per_node} it must be a multiple of it",
        )

    @property
    def gpus(self) -> int:
        """GPUs in all."""
        return self.cp * self.tp

    @property
    def nodes(self) -> int:
        """Nodes in all (a rank smaller than a node still takes one)."""
        return self.cp * math.ceil(self.tp / self.gpus_per_node)


def attention_params_per_layer(config: ModelConfig) -> int:
    """Weights of one block's Q, K, V and O projections."""
    return config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)


def ffn_params_per_layer(config: ModelConfig) -> int:
    """Weights of one block's SwiGLU MLP (gate, up, down)."""
    return 3 * config.dim * config.ffn_dim


def linear_params_per_layer(config: ModelConfig) -> int:
    """Weights of one block's matmuls (Q, K, V, O projections and the SwiGLU MLP)."""
    return attention_params_per_layer(config) + ffn_params_per_layer(config)


def weight_bytes_per_layer(config: ModelConfig, deployment: Deployment) -> float:
    """Bytes of one block's weights (all GPUs together): projections, FFN, two norms."""
    return (
        attention_params_per_layer(config) * deployment.weight_bytes
        + ffn_params_per_layer(config) * deployment.ffn_weight_bytes
        + 2 * config.dim * deployment.weight_bytes
    )


def linear_layer_time(config: ModelConfig, rows: int, deployment, hardware, constants) -> float:
    """One block's matmuls on one GPU for ``rows`` token rows of its rank (each GPU of the
    rank's ``tp`` computes ``1/tp`` of the columns for every row): the FLOPs or the weight
    read, whichever is longer (:func:`cpjax.perfmodel.kernels.linear_time`)."""
    flops = 2 * linear_params_per_layer(config) * rows / deployment.tp
    weights = weight_bytes_per_layer(config, deployment) / deployment.tp
    return linear_time(flops, rows, weights, hardware, constants)


def prefill_flops(config: ModelConfig, new_tokens: int, cached_tokens: int = 0) -> dict:
    """FLOPs of a prefill (all layers): ``{"linear", "attention", "total"}``; attention counts
    the visible part only (causal half on the new tokens, every cached key)."""
    t, p = new_tokens, cached_tokens
    linear = 2 * linear_params_per_layer(config) * t * config.n_layers
    attention = 4 * t * (p + t / 2) * config.n_heads * config.head_dim * config.n_layers
    return {"linear": linear, "attention": attention, "total": linear + attention}


def heads_per_gpu(config: ModelConfig, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) on one GPU; KV heads are replicated when ``tp > n_kv_heads``."""
    require(
        config.n_heads % tp == 0 or tp % config.n_heads == 0,
        f"tp={tp}: must divide n_heads={config.n_heads} (or be a multiple of it)",
    )
    return max(1, config.n_heads // tp), max(1, config.n_kv_heads // tp)


def ring_bytes_per_layer(
    strategy: str, config: ModelConfig, new_tokens: int, cached_tokens: int, deployment: Deployment
) -> int:
    """Bytes one GPU sends per layer in the context-parallel ring (``cpjax.parallel.comm``)."""
    n = deployment.cp
    hq, hkv = heads_per_gpu(config, deployment.tp)
    tq = math.ceil(new_tokens / n)
    tk = math.ceil((new_tokens + cached_tokens) / n)
    return formula_bytes_per_layer(
        strategy, n, tq, tk, hq, hkv, config.head_dim, deployment.bytes_per_element
    )


def all_to_all_bytes_per_layer(config: ModelConfig, new_tokens: int, deployment) -> int:
    """Bytes one GPU sends in pass-Q's All2All: N-1 partial outputs with their fp32 LSE."""
    n = deployment.cp
    hq, _ = heads_per_gpu(config, deployment.tp)
    tq = math.ceil(new_tokens / n)
    return (n - 1) * tq * hq * (config.head_dim * deployment.bytes_per_element + 4)


def ring_step_times(
    config: ModelConfig,
    new_tokens: int,
    cached_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    strategy: str,
    constants: Constants | None = None,
) -> dict:
    """One ring step on one GPU and one layer (seconds): ``attention`` (one call) and
    ``sendrecv`` (one block's transfer), plus pass-Q's final ``all_to_all`` (once per layer):
    the quantities of the paper's Table 5."""
    constants = constants_for(hardware) if constants is None else constants
    n = deployment.cp
    hq, _ = heads_per_gpu(config, deployment.tp)
    t = math.ceil(new_tokens / n)
    cached = math.ceil(cached_tokens / n)
    causal_flops = 4 * new_tokens * (new_tokens / 2) * hq * config.head_dim / n / n
    chunks = 2 if n > 1 else 1
    attention = (
        constants.kernel_launch_s
        + dense_attention_time(t, cached, chunks, hq, config.head_dim, hardware, constants)
        + causal_attention_time(causal_flops, hardware, constants)
    )
    ring = ring_bytes_per_layer(strategy, config, new_tokens, cached_tokens, deployment)
    a2a = all_to_all_bytes_per_layer(config, new_tokens, deployment) if strategy == "pass_q" else 0
    step_bytes = (ring - a2a) / (n - 1) if n > 1 else 0
    return {
        "attention": attention,
        "sendrecv": sendrecv_time(step_bytes, constants),
        "all_to_all": all_to_all_time(a2a, n, constants),
    }


def _ring_layer_times(config, new_tokens, cached_tokens, deployment, hardware, strategy, c):
    """Per layer (seconds): attention, sendrecv (all transfers), exposed_sendrecv, all_to_all,
    sync — the ring's part of one layer on one GPU."""
    n = deployment.cp
    if strategy == "all_gather" and n > 1:
        hq, _ = heads_per_gpu(config, deployment.tp)
        t = math.ceil(new_tokens / n)
        causal_flops = 4 * new_tokens * (new_tokens / 2) * hq * config.head_dim / n
        attention = (
            c.kernel_launch_s
            + dense_attention_time(t, cached_tokens, 2, hq, config.head_dim, hardware, c)
            + causal_attention_time(causal_flops, hardware, c)
        )
        ring = ring_bytes_per_layer(strategy, config, new_tokens, cached_tokens, deployment)
        gather = all_gather_time(ring / (n - 1), n, c)
        return {
            "attention": attention,
            "sendrecv": gather,
            "exposed_sendrecv": gather,
            "all_to_all": 0.0,
            "sync": 0.0,
        }
    step = ring_step_times(config, new_tokens, cached_tokens, deployment, hardware, strategy, c)
    exposed = max(0.0, step["sendrecv"] - step["attention"])
    return {
        "attention": n * step["attention"],
        "sendrecv": (n - 1) * step["sendrecv"],
        "exposed_sendrecv": (n - 1) * exposed,
        "all_to_all": step["all_to_all"],
        "sync": (n - 1) * c.ring_step_sync_s,
    }


def prefill_time(
    config: ModelConfig,
    new_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    cached_tokens: int = 0,
    strategy: str = "auto",
    constants: Constants | None = None,
) -> dict:
    """Predicted TTFT of a prefill and its breakdown over all layers (seconds, bytes).

    ``strategy="auto"`` is the paper's heuristic (``cpjax.parallel.heuristic``), the ring the
    engine would run; ``constants`` defaults to the preset's (:func:`constants_for`).
    ``ttft_s = linear_s + attention_s + exposed_sendrecv_s + all_to_all_s + sync_s +
    tp_allreduce_s``; ``bound`` says whether compute (linear + attention) or communication
    (the rest) is the larger part.
    """
    require(new_tokens >= 1, f"new_tokens={new_tokens}: must be >= 1")
    require(cached_tokens >= 0, f"cached_tokens={cached_tokens}: must be >= 0")
    c = constants_for(hardware) if constants is None else constants
    n, tp, e = deployment.cp, deployment.tp, deployment.bytes_per_element
    if strategy == "auto":
        strategy = choose_strategy(
            new_tokens, cached_tokens, config, n, hardware, bytes_per_element=e
        )
    check_choice("context-parallel strategy", strategy, STRATEGIES)
    layers = config.n_layers
    t = math.ceil(new_tokens / n)
    linear = linear_layer_time(config, t, deployment, hardware, c)
    tp_allreduce = 2 * all_reduce_time(
        t * config.dim * e, tp, deployment.gpus_per_node, hardware, c
    )
    ring = _ring_layer_times(config, new_tokens, cached_tokens, deployment, hardware, strategy, c)
    parts = {
        "linear_s": layers * linear,
        "attention_s": layers * ring["attention"],
        "exposed_sendrecv_s": layers * ring["exposed_sendrecv"],
        "all_to_all_s": layers * ring["all_to_all"],
        "sync_s": layers * ring["sync"],
        "tp_allreduce_s": layers * tp_allreduce,
    }
    ttft = sum(parts.values())
    compute = parts["linear_s"] + parts["attention_s"]
    flops = prefill_flops(config, new_tokens, cached_tokens)["total"]
    ring_bytes = ring_bytes_per_layer(strategy, config, new_tokens, cached_tokens, deployment)
    return {
        "ttft_s": ttft,
        **parts,
        "compute_s": compute,
        "sendrecv_s": layers * ring["sendrecv"],
        "strategy": strategy,
        "bound": "compute" if compute >= ttft - compute else "communication",
        "flops": flops,
        "flop_utilization": flops / deployment.gpus / ttft / hardware.peak_flops,
        "ring_bytes_per_gpu_per_layer": ring_bytes,
        "ring_bytes_per_gpu": ring_bytes * layers,
    }


def fastest_strategy(
    config: ModelConfig,
    new_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    cached_tokens: int = 0,
    constants: Constants | None = None,
    strategies=STRATEGIES,
) -> dict:
    """The :func:`prefill_time` of whichever of ``strategies`` the model predicts fastest."""
    predictions = [
        prefill_time(config, new_tokens, deployment, hardware, cached_tokens, s, constants)
        for s in strategies
    ]
    return min(predictions, key=lambda p: p["ttft_s"])
