"""The fitted constants and the one published number each is fitted on (:data:`FITS`)."""

from __future__ import annotations

import functools

from cpjax.config import PRESETS as MODELS
from cpjax.hardware import PRESETS as HARDWARE
from cpjax.perfmodel.calibration import Fit
from cpjax.perfmodel.decode import attention_path, decode_time
from cpjax.perfmodel.prefill import Deployment, prefill_time, ring_step_times

_MODEL = MODELS["llama3-405b"]
_RDMA = HARDWARE["h100-rdma"]


def _ttft(tokens: int, cp: int, constants) -> float:
    return prefill_time(_MODEL, tokens, Deployment(cp=cp), _RDMA, strategy="pass_kv",
                        constants=constants)["ttft_s"]  # fmt: skip


def _table5(new_tokens: int, strategy: str, component: str, constants) -> float:
    step = ring_step_times(_MODEL, new_tokens, 128000 - new_tokens, Deployment(cp=4), _RDMA,
                           strategy, constants)  # fmt: skip
    return 1e6 * step[component]


def _table8(cp: int, component: str, constants) -> float:
    path = attention_path(_MODEL, 131072, Deployment(cp=cp), _RDMA, 1, "ring_pass_q", constants)
    return 1e6 * path[component] / (cp - 1 if component == "sendrecv" else 1)


def _ttit(context: int, cp: int, constants) -> float:
    return decode_time(_MODEL, context, Deployment(cp=cp), _RDMA, constants=constants)["ttit_ms"]


def _p(function, *args):
    return functools.partial(function, *args)


#: In fitting order. Each constant is fitted on exactly one published number (Llama3-405B,
#: TP8 nodes, RDMA); every other published number is held out.
FITS = (
    Fit("gemm_efficiency", 42.010, "s", "Table 6: TTFT, 128K, TP8 (1 node)",
        _p(_ttft, 131072, 1), (0.05, 1.0)),
    Fit("dense_attention_efficiency", 1608.0, "µs", "Table 5: ATTN per step, 10% miss, pass-KV",
        _p(_table5, 12800, "pass_kv", "attention"), (0.05, 1.0)),
    Fit("kernel_launch_s", 14.7, "µs", "Table 8: one attention op, 128K, B=1, CP4",
        _p(_table8, 4, "attention_op"), (0.0, 1e-4)),
    Fit("sendrecv_latency_s", 32.3, "µs", "Table 8: SendRecv, 128K, B=1, CP2",
        _p(_table8, 2, "sendrecv"), (0.0, 1e-3)),
    Fit("sendrecv_bandwidth", 631.0, "µs", "Table 5: SendRecv per step, 10% miss, pass-KV",
        _p(_table5, 12800, "pass_kv", "sendrecv"), (1e8, 1e12)),
    Fit("all_to_all_latency_s", 81.1, "µs", "Table 8: All2All, 128K, B=1, CP2",
        _p(_table8, 2, "all_to_all"), (0.0, 1e-3)),
    Fit("all_to_all_bandwidth", 1023.0, "µs", "Table 5: All2All, 10% miss, pass-Q",
        _p(_table5, 12800, "pass_q", "all_to_all"), (1e8, 1e12)),
    Fit("ring_step_sync_s", 5.85, "s", "Fig. 6a text: TTFT, 128K, CP8",
        _p(_ttft, 131072, 8), (0.0, 1e-2)),
    Fit("nvlink_allreduce_latency_s", 46.26, "ms", "Table 6: TTIT, 128K, TP8 (1 node)",
        _p(_ttit, 131072, 1), (0.0, 1e-3)),
)  # fmt: skip


#: Every constant that is not fitted: (name, value, unit, source).
SOURCED = (
    ("peak_flops", 800e12 / 1e12, "TF/s", "paper §4.1: power-limited 500 W H100, bf16 peak"),
    ("memory_bandwidth", 2.4e12 / 1e12, "TB/s", "paper §4.1: 96 GB HBM2e at 2.4 TB/s"),
    ("memory_bytes", 96e9 / 1e9, "GB", "paper §4.1"),
    ("link_bandwidth (RDMA, heuristic only)", 50, "GB/s", "paper §4.1: 400 Gb/s per GPU"),
    ("TCP achieved bandwidth", 3, "GB/s", "paper §4.2.1: ~3 GB/s per rank over TCP"),
    ("nvlink_bandwidth", 450, "GB/s", "NVIDIA H100 SXM: NVLink 4, 900 GB/s both directions"),
    ("sm_count", 132, "SMs", "NVIDIA H100 SXM"),
    ("causal_attention_efficiency", 540 / 800, "of peak", "paper App. A: FA3 causal, 540 TF/s"),
    ("q_tile_rows", 128, "rows", "FlashAttention-3 forward tile at head dim 128"),
    ("gemm_half_rows", 0, "rows", "structural: small GEMMs are bounded by their weight read"),
    ("Flash-Decoding kernels per call", 2, "kernels", "split-K + combine (paper §4.1)"),
    ("decode_kernels_per_layer", 9, "kernels", "structural: norms, QKV, RoPE, KV append, O, MLP"),
    ("ffn_weight_bytes", 1, "B", "paper §4.1: row-wise FP8 FFN weights"),
)
