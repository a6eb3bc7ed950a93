"""Every gin-configured experiment runs end to end with a tiny setting and writes JSON + PNG;
the GPU configs name the GPU platform (and run when a GPU is visible)."""

import functools
import json
import os
import subprocess
import sys

import pytest

from cpjax.errors import CpjaxError
from experiments import cp_overhead
from experiments import run as runner
from experiments.provenance import git_state

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = os.path.join(ROOT, "experiments", "configs")

TINY = {
    "cp_overhead": [
        "lengths = [64, 96]",
        "contexts = [1, 2]",
        "strategies = ['pass_kv', 'pass_q']",
        "repeats = 3",
    ],
    "strategy_sweep": [
        "new_tokens = [16]",
        "cached_tokens = [0, 40]",
        "context = 2",
        "repeats = 1",
    ],
    "decode": ["cached_tokens = [100]", "contexts = [1, 2]", "steps = 2"],
    "finetune": ["seq_len = 256", "contexts = [1, 2]", "steps = 1"],
    "paper_model": ["model = 'llama3-405b'", "scaling_tokens = [131072]", "nodes = [1, 4]"],
    "strategy_map": [
        "cp = [4]",
        "new_tokens_range = [1024, 131072]",
        "cached_tokens_range = [4096, 131072]",
        "points_per_octave = 1",
    ],
}
ANALYTICAL = {"paper_model", "strategy_map"}  # performance model only: no weights
MEASURED_ON_GPU = ("cp_overhead", "decode", "strategy_sweep")  # each has a <name>_gpu.gin


def _bindings(name, out, figure, settings):
    model = [] if name in ANALYTICAL else [f"run_{name}.model = 'tiny'"]
    return [
        *model,
        f"run_{name}.out = '{out}'",
        f"run_{name}.figure = '{figure}'",
        *(f"run_{name}.{b}" for b in settings),
    ]


def _run_tiny(name, tmp_path):
    out, figure = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    results = runner.run(
        os.path.join(CONFIGS, f"{name}.gin"), _bindings(name, out, figure, TINY[name])
    )
    return results, out, figure


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``tiny_run(name)``: ``_run_tiny(name, ...)``, run once per module."""
    runs = {}

    def get(name):
        if name not in runs:
            runs[name] = _run_tiny(name, tmp_path_factory.mktemp(name))
        return runs[name]

    return get


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_config_runs_with_a_tiny_setting(name, tiny_run):
    results, out, figure = tiny_run(name)
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(results["rows"]))
    assert figure.stat().st_size > 10_000
    assert results["rows"]
    assert written["git"] == results["git"] == git_state()
    assert len(written["git"]["commit"]) == 40 and isinstance(written["git"]["dirty"], bool)


def test_cp_overhead_times_every_point_three_times_and_tables_every_row(tiny_run):
    results, out, _ = tiny_run("cp_overhead")
    for row in results["rows"]:
        assert row["seconds_min"] <= row["seconds_median"] <= row["seconds_max"]
    lines = cp_overhead.table(results).splitlines()
    assert lines[0] == "| tokens | ring | N=1 (s) | N=2 |"
    assert [line.split(" | ")[:2] for line in lines[2:]] == [
        ["| 64", "pass-KV"],
        ["| 64", "pass-Q"],
        ["| 96", "pass-KV"],
        ["| 96", "pass-Q"],
    ]
    printed = subprocess.run(
        [sys.executable, "-m", "experiments.cp_overhead", "--table", "--results", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.splitlines() == lines


def test_finetune_records_speed_and_memory_per_rank_count(tiny_run):
    results, out, figure = tiny_run("finetune")
    written = json.loads(out.read_text())
    assert (written["model"], written["seq_len"], written["strategy"], written["remat"]) == (
        "tiny",
        256,
        "pass_kv",
        "full",
    )
    assert "does not speed up" in written["note"]
    assert [r["context"] for r in written["rows"]] == [1, 2]
    for row in written["rows"]:
        assert row["tokens"] == 256 and row["tokens_per_s"] > 0
        assert row["temp_bytes_per_device"] > 0
        assert row["seconds_min"] <= row["seconds_median"] <= row["seconds_max"]
        assert row["ideal_memory_ratio"] == 1 / row["context"]
    base = written["rows"][0]
    assert base["memory_ratio_to_context_1"] == base["tokens_per_s_ratio_to_context_1"] == 1
    assert figure.stat().st_size > 10_000


def test_cp_overhead_refuses_fewer_than_three_repeats(tmp_path):
    with pytest.raises(CpjaxError, match="repeats=2: time each point at least 3 times"):
        runner.run(
            os.path.join(CONFIGS, "cp_overhead.gin"),
            _bindings(
                "cp_overhead",
                tmp_path / "x.json",
                tmp_path / "x.png",
                [*TINY["cp_overhead"], "repeats = 2"],
            ),
        )


def test_strategy_map_agrees_with_table_4_and_fills_the_grid(tmp_path):
    results, _, _ = _run_tiny("strategy_map", tmp_path)
    table4 = results["table4_summary"]
    assert table4["rows"] == 14
    # The model misses T = 3200, 4160, 6400, where the paper measured pass-Q 6, 1.5, 0.3 % faster.
    assert table4["model_matches_measured"] >= 11
    assert (table4["heuristic_matches_measured"], table4["refined_matches_measured"]) == (12, 11)
    rows = results["rows"]
    assert len(rows) == len(results["new_tokens"]) * len(results["cached_tokens"])
    assert results["cached_tokens"][0] == 0
    by_cell = {(r["new_tokens"], r["cached_tokens"]): r for r in rows}
    news, cached = results["new_tokens"], results["cached_tokens"]
    assert by_cell[news[0], cached[-1]]["faster"] == "pass_q"  # few new tokens, long cache
    assert by_cell[news[-1], 0]["faster"] == "pass_kv"  # full prefill
    assert results["agreement"]["all"]["heuristic"]["agreement"] >= 0.85
    assert 1 <= results["agreement"]["all"]["heuristic"]["worst_slowdown"] < 1.5


def test_strategy_map_rejects_a_context_parallel_size_without_a_ring(tmp_path):
    with pytest.raises(CpjaxError, match=r"cp=\[1, 4\]: every size must be an int >= 2"):
        runner.run(
            os.path.join(CONFIGS, "strategy_map.gin"),
            _bindings("strategy_map", tmp_path / "x.json", tmp_path / "x.png", ["cp = [1, 4]"]),
        )


def test_every_config_is_covered():
    names = {os.path.splitext(f)[0] for f in os.listdir(CONFIGS) if f.endswith(".gin")}
    assert names == set(TINY) | {f"{name}_gpu" for name in MEASURED_ON_GPU}


@pytest.mark.parametrize("name", MEASURED_ON_GPU)
def test_gpu_config_binds_the_gpu_platform_and_bfloat16(name):
    import gin

    path = os.path.join(CONFIGS, f"{name}_gpu.gin")
    assert runner.experiment_name(path) == name
    assert runner.bound_platform(path) == "gpu"
    assert runner.bound_platform(path, [f"run_{name}.platform = 'cpu'"]) == "cpu"
    runner.configurable(name)
    gin.clear_config()
    try:
        gin.parse_config_file(path)
        assert gin.query_parameter(f"run_{name}.platform") == "gpu"
        assert gin.query_parameter(f"run_{name}.dtype") == "bfloat16"
    finally:
        gin.clear_config()


def test_unknown_platform_is_a_clear_error():
    with pytest.raises(SystemExit, match=r"run_decode.platform = 'tpu': choose one of 'cpu'"):
        runner.bound_platform(os.path.join(CONFIGS, "decode.gin"), ["run_decode.platform = 'tpu'"])


def test_devices_check_names_the_missing_platform_and_devices():
    import jax

    from experiments.devices import check_devices

    if jax.devices()[0].platform == "cpu":
        with pytest.raises(CpjaxError, match="platform='gpu': no GPU is visible to jax"):
            check_devices("gpu", [1])
    with pytest.raises(
        CpjaxError,
        match=r"contexts=\[1, 4096\]: a context-parallel size may "
        "not exceed",
    ):
        check_devices(jax.devices()[0].platform, [1, 4096])
    assert check_devices("cpu", [1])["device_count"] == len(jax.devices())


@functools.lru_cache(maxsize=None)
def _gpu_visible() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices('gpu')"],
        env={**os.environ, "JAX_PLATFORMS": runner.JAX_PLATFORMS["gpu"]},
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.parametrize("name", MEASURED_ON_GPU)
def test_gpu_config_runs_with_a_tiny_setting(name, tmp_path):
    if not _gpu_visible():
        pytest.skip("no GPU visible to jax")
    out, figure = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    settings = [b for b in TINY[name] if not b.startswith(("contexts ", "context "))]  # GPU: 1
    bindings = _bindings(name, out, figure, settings)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            os.path.join(CONFIGS, f"{name}_gpu.gin"),
            *(arg for b in bindings for arg in ("--gin", b)),
        ],
        cwd=ROOT,
        check=True,
    )
    results = json.loads(out.read_text())
    assert results["platform"] == "gpu" and results["dtype"] == "bfloat16" and results["rows"]
    assert figure.stat().st_size > 10_000


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        runner.run(str(tmp_path / "nope.gin"))


def test_bench_cpu_records_the_host_and_the_spread_of_both_sides():
    from experiments import bench_cpu

    host = bench_cpu.host_info()
    assert host["cpu_count"] >= 1 and host["cpu_model"]
    assert set(host["vector_flags"]) <= set(bench_cpu.VECTOR_FLAGS)
    assert host["memory_copy_gb_s"] > 0.1
    assert bench_cpu.spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}


def test_prefill_profile_times_every_block_shape_and_torch_sdpa():
    pytest.importorskip("torch")
    from cpjax.config import PRESETS
    from experiments import prefill_profile

    got = prefill_profile.attention_ms(PRESETS["tiny"], tokens=128, repeats=1)
    names = {f"blockwise_{bq}x{bk}" for bq, bk in prefill_profile.BLOCKS} | {"torch_sdpa"}
    assert set(got) == names and all(ms > 0 for ms in got.values())


def test_bench_cpu_interleaves_the_sides_and_pairs_their_rounds():
    """Each round runs every measurement once per side back to back, alternating which side
    goes first; a host that slows down between rounds leaves the paired ratios exact."""
    from experiments import bench_cpu

    calls, host_speed = [], [1.0]

    def side(name, rate):
        def run(measurement, rate):
            calls.append((name, measurement))
            if measurement == "decode":
                host_speed[0] /= 2  # the host halves its speed after each decode
            return rate * host_speed[0]

        return {m: functools.partial(run, m, rate) for m in ("prefill_8", "decode")}

    rates = bench_cpu.interleaved({"a": side("a", 10.0), "b": side("b", 5.0)}, 2)
    assert calls[4:] == [
        ("a", "prefill_8"), ("b", "prefill_8"), ("a", "decode"), ("b", "decode"),
        ("b", "prefill_8"), ("a", "prefill_8"), ("b", "decode"), ("a", "decode"),
    ]  # fmt: skip
    got = bench_cpu.paired_ratios(rates["a"], rates["b"])
    assert got["prefill"] == {"8": {"min": 2.0, "median": 2.0, "max": 2.0}}
    assert bench_cpu.side_summary(rates["a"])["prefill_tok_s"]["8"]["max"] == 10.0 / 4


def test_scheduler_flag_children_differ_only_in_the_flag_and_rounds_pair():
    from cpjax.xla_env import CPU_COLLECTIVES_FLAG
    from experiments import scheduler_flag

    with_flag = scheduler_flag.child_xla_flags("flag", 4).split()
    without = scheduler_flag.child_xla_flags("no_flag", 4).split()
    assert CPU_COLLECTIVES_FLAG in with_flag and CPU_COLLECTIVES_FLAG not in without
    assert set(with_flag) - set(without) == {CPU_COLLECTIVES_FLAG}
    assert "--xla_force_host_platform_device_count=4" in without
    runs = [
        {"flag": {"prefill_s": 2.0}, "no_flag": {"prefill_s": 3.0}},
        {"flag": {"prefill_s": 4.0}, "no_flag": {"prefill_s": 4.0}},  # a slower round
        {"flag": {"prefill_s": 1.0}, "no_flag": {"prefill_s": 0.5}},
    ]
    got = scheduler_flag.paired(runs, "prefill_s")
    assert got["ratio_no_flag_over_flag"] == [1.5, 1.0, 0.5] and got["median_ratio"] == 1.0
    assert (got["flag_s"], got["no_flag_s"]) == (2.0, 3.0)


@pytest.mark.slow
def test_scheduler_flag_measures_both_settings_in_child_processes(tmp_path):
    from experiments import scheduler_flag

    out, figure = tmp_path / "flag.json", tmp_path / "flag.png"
    argv = ["--model", "tiny", "--devices", "2", "--tokens", "64", "--decode-steps", "2"]
    argv += ["--rounds", "1", "--strategies", "pass_q", "--out", str(out), "--figure", str(figure)]
    results = scheduler_flag.main(argv)
    (row,) = results["runs"]["pass_q"]
    assert all(row[s]["prefill_s"] > 0 and row[s]["decode_step_s"] > 0 for s in row)
    assert json.loads(out.read_text())["strategies"] == results["strategies"]
    assert figure.stat().st_size > 0
