"""Size a job: the smallest CP x TP mesh whose predicted TTFT meets a target and that fits.

:func:`enumerate_meshes` lists the meshes of whole nodes (TP fills one node or spans several,
``tp = gpus_per_node * 2^k`` dividing the query heads; CP ranks of ``tp`` GPUs each) up to
``max_nodes``. For each, :func:`plan` predicts the prefill with the ring the model finds
fastest, checks its memory per GPU, predicts decode (batch 1, the faster decode strategy) and
says what bounds it: ``memory`` when it does not fit, else ``compute`` or ``communication``
(the larger part of its TTFT).
"""

from __future__ import annotations

import dataclasses

from cpjax.config import ModelConfig
from cpjax.errors import require
from cpjax.hardware import Hardware
from cpjax.perfmodel.calibration import Constants, constants_for
from cpjax.perfmodel.decode import fastest_decode
from cpjax.perfmodel.memory import memory_per_gpu
from cpjax.perfmodel.prefill import Deployment, fastest_strategy


def enumerate_meshes(config: ModelConfig, gpus_per_node: int, max_nodes: int) -> list:
    """``Deployment`` of every (cp, tp) of whole nodes with at most ``max_nodes`` nodes."""
    require(gpus_per_node >= 1, f"gpus_per_node={gpus_per_node}: must be >= 1")
    require(max_nodes >= 1, f"max_nodes={max_nodes}: must be >= 1")
    meshes = []
    tp = gpus_per_node
    while tp <= config.n_heads and tp // gpus_per_node <= max_nodes:
        if config.n_heads % tp == 0:
            nodes_per_rank = tp // gpus_per_node
            for cp in range(1, max_nodes // nodes_per_rank + 1):
                meshes.append(Deployment(cp=cp, tp=tp, gpus_per_node=gpus_per_node))
        tp *= 2
    return meshes


def evaluate_mesh(
    config: ModelConfig,
    tokens: int,
    cached_tokens: int,
    deployment: Deployment,
    hardware: Hardware,
    target_ttft_s: float,
    constants: Constants,
) -> dict:
    """One row of the plan: predictions, memory and bound of one mesh."""
    prefill = fastest_strategy(config, tokens, deployment, hardware, cached_tokens, constants)
    memory = memory_per_gpu(
        config, tokens, deployment, hardware, cached_tokens, prefill["strategy"], constants
    )
    decode = fastest_decode(config, tokens + cached_tokens, deployment, hardware, 1, constants)
    bound = prefill["bound"] if memory["fits"] else "memory"
    return {
        "cp": deployment.cp,
        "tp": deployment.tp,
        "nodes": deployment.nodes,
        "gpus": deployment.gpus,
        "ttft_s": prefill["ttft_s"],
        "prefill_strategy": prefill["strategy"],
        "compute_s": prefill["compute_s"],
        "communication_s": prefill["ttft_s"] - prefill["compute_s"],
        "ttit_ms": decode["ttit_ms"],
        "decode_strategy": decode["strategy"],
        "memory_gb": memory["total"] / 1e9,
        "fits": memory["fits"],
        "meets_target": memory["fits"] and prefill["ttft_s"] <= target_ttft_s,
        "bound": bound,
    }


def plan(
    config: ModelConfig,
    tokens: int,
    hardware: Hardware,
    *,
    cached_tokens: int = 0,
    target_ttft_s: float = 60.0,
    gpu_memory_gb: float | None = None,
    gpus_per_node: int = 8,
    max_nodes: int = 32,
    constants: Constants | None = None,
) -> dict:
    """Every mesh ranked (meeting the target first, then fewest GPUs, then TTFT) and the
    ``chosen`` one: the fewest GPUs among those that fit and meet ``target_ttft_s`` (``None``
    when none does). ``gpu_memory_gb`` overrides the device's memory."""
    require(tokens >= 1, f"tokens={tokens}: must be >= 1")
    require(cached_tokens >= 0, f"cached_tokens={cached_tokens}: must be >= 0")
    require(target_ttft_s > 0, f"target_ttft_s={target_ttft_s}: must be > 0")
    require(
        gpu_memory_gb is None or gpu_memory_gb > 0, f"gpu_memory_gb={gpu_memory_gb}: must be > 0"
    )
    c = constants_for(hardware) if constants is None else constants
    if gpu_memory_gb is not None:
        hardware = dataclasses.replace(hardware, memory_bytes=gpu_memory_gb * 1e9)
    rows = [
        evaluate_mesh(config, tokens, cached_tokens, d, hardware, target_ttft_s, c)
        for d in enumerate_meshes(config, gpus_per_node, max_nodes)
    ]
    rows.sort(key=lambda r: (not r["meets_target"], r["gpus"], r["ttft_s"]))
    chosen = rows[0] if rows and rows[0]["meets_target"] else None
    return {
        "model": config.name,
        "hardware": hardware.name,
        "tokens": tokens,
        "cached_tokens": cached_tokens,
        "target_ttft_s": target_ttft_s,
        "gpu_memory_gb": hardware.memory_bytes / 1e9,
        "chosen": chosen,
        "meshes": rows,
    }
