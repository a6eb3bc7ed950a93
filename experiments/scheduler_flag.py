"""What the CPU collectives flag costs inference on fake devices.

Every cpjax entry point that simulates devices sets
``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (``cpjax.xla_env.CPU_COLLECTIVES_FLAG``;
a multi-device train step aborts without it). This measures what it costs a context-parallel
prefill and decode of an embedded model on ``--devices`` fake CPU devices: XLA flags are fixed
when jax starts, so each measurement is a child process, with and without the flag. The two
settings alternate round by round (the order flips every round, as in ``bench_cpu``: this kind
of host drifts up to 2x between minutes), and the ratio of a round pairs its two runs.

Writes ``experiments/results/scheduler_flag.json`` and ``experiments/figures/scheduler_flag.png``.
Usage: ``python -m experiments.scheduler_flag [--tokens 2048] [--rounds 3]
[--strategies pass_kv pass_q]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

from cpjax.io import save_figure

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTINGS = ("flag", "no_flag")  # with CPU_COLLECTIVES_FLAG (as shipped) / without it


def child_xla_flags(setting: str, devices: int) -> str:
    """``XLA_FLAGS`` of a child: ``devices`` fake devices, with or without the flag."""
    from cpjax.xla_env import CPU_COLLECTIVES_FLAG, fake_cpu_device_flags

    flags = fake_cpu_device_flags("", devices)
    if setting == "no_flag":
        flags = " ".join(f for f in flags.split() if f != CPU_COLLECTIVES_FLAG)
    return flags


def measure(model: str, devices: int, strategy: str, tokens: int, decode_steps: int) -> dict:
    """In this process (flags already set): median seconds of 3 prefills of ``tokens`` random
    ids and of one greedy decode step (over ``decode_steps``) after one compiling run of each,
    on a ``devices``-rank context mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cpjax.engine import Engine
    from cpjax.engine.placement import ContextParallel
    from cpjax.loaders.source import load_model
    from cpjax.parallel.mesh import make_mesh

    config, params, _ = load_model(model)
    placement = ContextParallel(make_mesh(devices, 1), strategy=strategy)
    engine = Engine(config, params, placement, dtype=jnp.float32)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, tokens).astype(np.int32)

    def prefill():
        cache = engine.new_cache(engine.prefill_slots(tokens) + decode_steps + 64)
        logits, cache = engine.prefill(ids, cache)
        jax.block_until_ready(logits)
        return logits, cache

    def decode(cache, steps: int):
        token, times = np.int32(ids[-1]), []
        for step in range(steps):
            start = time.perf_counter()
            _, next_tokens, cache = engine.decode([token], [tokens + step], [0], step, cache)
            token = np.asarray(next_tokens)[0]
            times.append(time.perf_counter() - start)
        return times

    decode(prefill()[1], 1)  # compiles both programs
    prefill_s = []
    for _ in range(3):
        start = time.perf_counter()
        _, cache = prefill()
        prefill_s.append(time.perf_counter() - start)
    return {
        "prefill_s": statistics.median(prefill_s),
        "decode_step_s": statistics.median(decode(cache, decode_steps)),
    }


def run_child(setting: str, strategy: str, args) -> dict:
    """One measurement of ``strategy`` in a fresh process with ``setting``'s flags."""
    env = {**os.environ, "XLA_FLAGS": child_xla_flags(setting, args.devices)}
    command = [sys.executable, "-m", "experiments.scheduler_flag", "--child", "--model", args.model]
    command += ["--devices", str(args.devices), "--tokens", str(args.tokens)]
    command += ["--decode-steps", str(args.decode_steps), "--strategies", strategy]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child ({setting}, {strategy}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def paired(runs: list[dict], metric: str) -> dict:
    """Per-round ``no_flag / flag`` time ratios of ``metric`` (> 1: the flag is faster) and
    their median, plus each setting's median seconds."""
    ratios = [r["no_flag"][metric] / r["flag"][metric] for r in runs]
    return {
        "flag_s": statistics.median(r["flag"][metric] for r in runs),
        "no_flag_s": statistics.median(r["no_flag"][metric] for r in runs),
        "ratio_no_flag_over_flag": ratios,
        "median_ratio": statistics.median(ratios),
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels, values = [], []
    for strategy, metrics in results["strategies"].items():
        for metric, summary in metrics.items():
            labels.append(f"{strategy}\n{metric.removesuffix('_s')}")
            values.append(summary["ratio_no_flag_over_flag"])
    ax.boxplot(values)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel("time without flag / time with flag (per round)")
    ax.set_title(
        f"{results['model']} on {results['devices']} fake CPU devices, "
        f"{results['tokens']} tokens, {results['rounds']} rounds"
    )
    save_figure(path, fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["pass_kv", "pass_q"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scheduler_flag.json"))
    parser.add_argument("--figure", default=os.path.join(HERE, "figures", "scheduler_flag.png"))
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.model, args.devices, args.strategies[0], args.tokens,
                         args.decode_steps)  # fmt: skip
        print(json.dumps(result))
        return result

    from experiments.bench_cpu import host_info
    from experiments.provenance import write_results

    runs = {strategy: [] for strategy in args.strategies}
    with tqdm(total=args.rounds * len(args.strategies) * 2, desc="child runs") as progress:
        for round_index in range(args.rounds):
            order = SETTINGS if round_index % 2 == 0 else SETTINGS[::-1]
            for strategy in args.strategies:
                row = {}
                for setting in order:
                    row[setting] = run_child(setting, strategy, args)
                    progress.update()
                runs[strategy].append(row)
    results = {
        "experiment": "scheduler_flag",
        "flag": child_xla_flags("flag", args.devices).split()[-1],
        "model": args.model,
        "devices": args.devices,
        "tokens": args.tokens,
        "decode_steps": args.decode_steps,
        "rounds": args.rounds,
        "machine": host_info(),
        "runs": runs,
        "strategies": {
            strategy: {metric: paired(rows, metric) for metric in ("prefill_s", "decode_step_s")}
            for strategy, rows in runs.items()
        },
    }
    results = write_results(args.out, results)
    plot(results, args.figure)
    for strategy, metrics in results["strategies"].items():
        print(strategy, {m: round(s["median_ratio"], 3) for m, s in metrics.items()})
    return results


if __name__ == "__main__":
    main()
