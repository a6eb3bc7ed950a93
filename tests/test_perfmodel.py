"""The analytical performance model against the paper's numbers and the compiled HLO."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.hardware import PAPER_H100_EFFICIENCY
from cpjax.hardware import PRESETS as HARDWARE
from cpjax.model.decoder import param_count
from cpjax.perfmodel import (
    Deployment,
    decode_time,
    fit_efficiency,
    prefill_flops,
    prefill_time,
    ring_bytes_per_layer,
)
from tests.test_heuristic import TABLE_4

LLAMA_405B = PRESETS["llama3-405b"]
RDMA = HARDWARE["h100-rdma"]

# (new tokens, CP nodes, paper TTFT in s): Tables 6/7, Fig. 6a (CP8 128K), Fig. 8 (CP16).
PAPER_TTFT = [
    (8192, 1, 1.740),
    (32768, 1, 7.658),
    (131072, 1, 42.010),
    (8192, 2, 0.999),
    (32768, 2, 4.015),
    (131072, 2, 21.042),
    (131072, 4, 10.950),
    (131072, 8, 5.85),
    (1_000_000, 16, 77.0),
]


def test_the_fitted_efficiency_comes_from_one_paper_point():
    fitted = fit_efficiency(LLAMA_405B, 131072, Deployment(cp=1, tp=8), RDMA, 42.010)
    assert fitted == pytest.approx(PAPER_H100_EFFICIENCY, abs=1e-4)


@pytest.mark.parametrize("tokens, cp, paper_s", PAPER_TTFT)
def test_ttft_within_15_percent_of_the_paper(tokens, cp, paper_s):
    predicted = prefill_time(LLAMA_405B, tokens, Deployment(cp=cp, tp=8), RDMA)["ttft_s"]
    assert abs(predicted / paper_s - 1) <= 0.15, predicted


@pytest.mark.xfail(
    strict=True,
    reason="model 2.6 s vs paper 3.8 s: at 128K over 128 GPUs a "
    "ring step is ~1 ms and fixed per-step costs the model lacks dominate",
)
def test_ttft_128k_on_cp16_within_15_percent():
    predicted = prefill_time(LLAMA_405B, 131072, Deployment(cp=16, tp=8), RDMA)["ttft_s"]
    assert abs(predicted / 3.8 - 1) <= 0.15, predicted


def test_appendix_a_flops_and_utilisation_at_1m():
    flops = prefill_flops(LLAMA_405B, 1_000_000)
    assert flops["linear"] == pytest.approx(8.1e17, rel=0.02)
    assert flops["attention"] == pytest.approx(4.1e18, rel=0.02)
    util = prefill_time(LLAMA_405B, 1_000_000, Deployment(cp=16, tp=8), RDMA)["flop_utilization"]
    assert 0.63 * 0.85 <= util <= 0.63 * 1.15  # paper: 502 TF/s of 800 = 63 %


def test_strategy_choice_agrees_with_table_4():
    agree = [
        prefill_time(LLAMA_405B, t, Deployment(cp=4, tp=8), RDMA, cached_tokens=p)["strategy"]
        == winner
        for p, t, winner in TABLE_4
    ]
    assert sum(agree) >= 12


def test_full_prefill_ring_is_hidden_and_pass_q_pays_its_all_to_all():
    kv = prefill_time(LLAMA_405B, 131072, Deployment(cp=4, tp=8), RDMA, strategy="pass_kv")
    q = prefill_time(LLAMA_405B, 131072, Deployment(cp=4, tp=8), RDMA, strategy="pass_q")
    assert kv["exposed_ring_s"] == 0 and q["exposed_ring_s"] > 0
    slow = prefill_time(
        LLAMA_405B,
        131072,
        Deployment(cp=4, tp=8),
        dataclasses.replace(RDMA, link_bandwidth=1e8),
        strategy="pass_kv",
    )
    assert slow["exposed_ring_s"] > 1.0


def test_decode_is_memory_bound_and_scales_with_the_cache():
    short = decode_time(LLAMA_405B, 8192, Deployment(cp=1, tp=8), RDMA)
    long = decode_time(LLAMA_405B, 131072, Deployment(cp=1, tp=8), RDMA)
    assert short["weight_bytes_per_gpu"] == pytest.approx(param_count(LLAMA_405B) * 2 / 8)
    assert long["kv_bytes_per_gpu"] == 16 * short["kv_bytes_per_gpu"]
    split = decode_time(LLAMA_405B, 131072, Deployment(cp=4, tp=8), RDMA)
    assert split["kv_bytes_per_gpu"] == long["kv_bytes_per_gpu"] / 4


@pytest.mark.parametrize("strategy", ["pass_kv", "pass_q", "all_gather"])
def test_ring_bytes_equal_those_of_the_compiled_hlo(strategy, tiny_params):
    from cpjax.engine import ContextParallel, Engine
    from cpjax.parallel.comm import hlo_collective_bytes
    from cpjax.parallel.mesh import make_mesh

    tiny = PRESETS["tiny"]
    engine = Engine(tiny, tiny_params, ContextParallel(mesh=make_mesh(4), strategy=strategy))
    layout = engine.placement.row_layout(
        np.arange(128), np.zeros(128, np.int32), engine.bucket, engine.forward.attention
    )
    args = engine._rows(layout, np.arange(128) % tiny.vocab_size)
    hlo = engine._program("logits", strategy).lower(engine.params, *args).compile().as_text()
    sent = sum(hlo_collective_bytes(hlo, 4).values())
    assert sent == ring_bytes_per_layer(
        strategy, tiny, 128, 0, Deployment(cp=4, tp=1, bytes_per_element=4)
    )


def test_cli_prints_the_prediction_as_json():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpjax",
            "perfmodel",
            "--model",
            "llama3-405b",
            "--tokens",
            "1048576",
            "--cp-nodes",
            "16",
            "--tp",
            "8",
            "--hardware",
            "h100-rdma",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["strategy"] == "pass_kv" and 60 < result["ttft_s"] < 90
    bad = subprocess.run(
        [sys.executable, "-m", "cpjax", "perfmodel", "--tokens", "10", "--hardware", "a100"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--hardware 'a100'" in bad.stderr
