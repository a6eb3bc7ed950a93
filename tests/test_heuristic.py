"""The pass-KV / pass-Q heuristic (paper Algorithms 1 and 5) and the hardware presets."""

import dataclasses

import pytest

from cpjax.config import PRESETS
from cpjax.errors import CpjaxError
from cpjax.hardware import PRESETS as HARDWARE
from cpjax.hardware import Hardware, calibrate_cpu, get_hardware
from cpjax.parallel.heuristic import choose_strategy, explain_strategy
from experiments.paper_model import TABLE_4 as TABLE_4_MS
from experiments.strategy_map import measured_winner

LLAMA_405B = PRESETS["llama3-405b"]  # 128 query heads, 8 KV heads
RDMA, TCP = HARDWARE["h100-rdma"], HARDWARE["h100-tcp"]

# Paper Table 4: CP4 on the RDMA cluster, P + T = 128000; (P, T, measured winner).
TABLE_4 = [(p, t, measured_winner(kv_ms, q_ms)) for p, t, kv_ms, q_ms in TABLE_4_MS]


def test_eq2_threshold_matches_the_paper_derivation():
    """T* = N C e / (32 BW) for 405B: 1000 N on RDMA, 4000 N on TCP."""
    for n in (2, 4, 16):
        assert explain_strategy(1, 0, LLAMA_405B, n, RDMA).hidden_kv_tokens == pytest.approx(
            1000 * n
        )
        assert explain_strategy(1, 0, LLAMA_405B, n, TCP).hidden_kv_tokens == pytest.approx(
            4000 * n
        )


def test_basic_miss_rate_threshold_is_2_hkv_over_hq():
    assert explain_strategy(10, 10**6, LLAMA_405B, 4, RDMA).miss_rate_threshold == pytest.approx(
        0.125
    )


def test_agrees_with_table_4_in_at_least_12_of_14_rows():
    agree = [choose_strategy(t, p, LLAMA_405B, 4, RDMA) == winner for p, t, winner in TABLE_4]
    assert sum(agree) >= 12, agree
    # The rows it misses are the near-ties (within 1.5 % in the paper): T = 4160 and 6400.
    assert all(a for a, (p, t, _) in zip(agree, TABLE_4) if t not in (4160, 6400))


def test_both_sides_of_each_threshold():
    n = 4
    t_star = explain_strategy(1, 0, LLAMA_405B, n, RDMA).hidden_kv_tokens
    # Eq. 2: just above T*, pass-KV whatever the cache; just below, a huge cache -> pass-Q.
    assert choose_strategy(int(t_star) + 1, 10**9, LLAMA_405B, n, RDMA) == "pass_kv"
    assert choose_strategy(int(t_star) - 1, 10**9, LLAMA_405B, n, RDMA) == "pass_q"
    # Miss-rate test at small T (Eq. 1, and Eq. 5 with refined=True).
    t = 100
    for refined in (False, True):
        threshold = explain_strategy(t, 0, LLAMA_405B, n, RDMA, refined=refined).miss_rate_threshold
        p_at = t / threshold - t
        assert (
            choose_strategy(t, int(p_at * 0.99), LLAMA_405B, n, RDMA, refined=refined) == "pass_kv"
        )
        assert (
            choose_strategy(t, int(p_at * 1.01), LLAMA_405B, n, RDMA, refined=refined) == "pass_q"
        )


def test_full_prefill_is_pass_kv_and_decode_like_calls_are_pass_q():
    assert choose_strategy(1000, 0, LLAMA_405B, 16, TCP) == "pass_kv"  # P = 0 (Eq. 1)
    assert choose_strategy(1, 100000, LLAMA_405B, 16, TCP) == "pass_q"  # T = 1
    assert choose_strategy(1, 100000, LLAMA_405B, 1, TCP) == "pass_kv"  # no ring at N = 1


def test_refined_threshold_is_lower_than_the_basic_one():
    refined = explain_strategy(3000, 10**6, LLAMA_405B, 4, RDMA, refined=True)
    basic = explain_strategy(3000, 10**6, LLAMA_405B, 4, RDMA)
    assert refined.miss_rate_threshold == pytest.approx(0.125 - 4 * 3000 * 50e9 / (4 * 800e12 * 2))
    assert refined.miss_rate_threshold < basic.miss_rate_threshold
    refined_agree = sum(
        choose_strategy(t, p, LLAMA_405B, 4, RDMA, refined=True) == w for p, t, w in TABLE_4
    )
    assert refined_agree == 11


def test_hardware_presets_and_errors():
    assert get_hardware("h100-rdma").link_bandwidth == 50e9
    assert get_hardware("h100-tcp").peak_flops == 800e12
    with pytest.raises(CpjaxError, match="unknown hardware 'a100': choose one of"):
        get_hardware("a100")
    with pytest.raises(CpjaxError, match="peak_flops=0 must be > 0"):
        Hardware("bad", 0, 1, 1)
    with pytest.raises(CpjaxError, match="new_tokens=0: must be >= 1"):
        choose_strategy(0, 5, LLAMA_405B, 4, RDMA)


def test_cpu_calibration_measures_positive_figures():
    hw = calibrate_cpu(matmul_size=128, message_floats=1 << 14)
    assert hw.name == "cpu" and hw.peak_flops > 1e7 and hw.link_bandwidth > 1e6
    assert dataclasses.replace(hw, name="x").peak_flops == hw.peak_flops


def test_hardware_preset_names_are_the_ones_in_cpjax_names():
    from cpjax.names import HARDWARE_PRESETS

    assert sorted(HARDWARE_PRESETS) == sorted([*HARDWARE, "cpu"])
    with pytest.raises(CpjaxError, match="unknown hardware 'a100': choose one of h100-nvlink"):
        get_hardware("a100")
