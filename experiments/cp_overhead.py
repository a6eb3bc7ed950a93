"""Ring overhead of context-parallel prefill on fake CPU devices (gin-configurable).

The fake devices share the machine's cores, so a CP run cannot be faster than the single-device
run; the ratio ``time(context=N) / time(context=1)`` measures what the ring, the layout and the
smaller per-device matmuls cost. Also records the bytes each rank sends per layer (formula of
``cpjax.parallel.comm``, checked against the compiled HLO in the tests).

Every point is timed ``repeats >= 3`` times; rows record the min, median and max seconds, and
ratios use medians.

Run: ``python -m experiments.run experiments/configs/cp_overhead.gin
[--gin "run_cp_overhead.lengths = [2048]"]``. Writes ``experiments/results/cp_overhead.json``
and ``experiments/figures/cp_overhead.png``. On GPUs: ``cp_overhead_gpu.gin`` (it binds
``platform = 'gpu'``). ``python -m experiments.cp_overhead --table [--results PATH]`` prints
the README table (every length and strategy) from a results JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from cpjax.names import STRATEGIES

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_REPEATS = 3
RING_NAMES = {"pass_kv": "pass-KV", "pass_q": "pass-Q", "all_gather": "all-gather"}


def _time_prefill(engine, ids, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` prefills of ``ids`` (after one compiling run)."""
    import jax

    def once():
        logits, cache = engine.prefill(ids, engine.new_cache(engine.prefill_slots(ids.size)))
        jax.block_until_ready((logits, cache))

    once()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return times


def _tokens_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def table(results: dict) -> str:
    """Markdown table of ``results``: one line per (length, ring), one column per N.

    The N=1 column is the single-device median in seconds; a cell at N > 1 is the median ratio
    to it, followed by the (min-max) range of the N > 1 times over that median.
    """
    rows = results["rows"]
    contexts = sorted({r["context"] for r in rows if r["context"] > 1})
    base = {r["tokens"]: r["seconds_median"] for r in rows if r["context"] == 1}
    cell = {(r["tokens"], r["strategy"], r["context"]): r for r in rows}
    lines = [
        "| tokens | ring | N=1 (s) | " + " | ".join(f"N={c}" for c in contexts) + " |",
        "|---|---|---|" + "---|" * len(contexts),
    ]
    strategies = [s for s in RING_NAMES if any(key[1] == s for key in cell)]
    for tokens in sorted(base):
        for strategy in strategies:
            ratios = [_ratio_cell(cell.get((tokens, strategy, c)), base[tokens]) for c in contexts]
            lines.append(
                f"| {_tokens_label(tokens)} | {RING_NAMES[strategy]} | "
                f"{base[tokens]:.2f} | " + " | ".join(ratios) + " |"
            )
    return "\n".join(lines)


def _ratio_cell(row, base_seconds: float) -> str:
    """``median ratio (min-max)`` of one row over the single-device median; empty if absent."""
    if row is None:
        return ""
    return (
        f"{row['ratio_to_context_1']:.2f} ({row['seconds_min'] / base_seconds:.2f}-"
        f"{row['seconds_max'] / base_seconds:.2f})"
    )


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpjax.io import save_figure
    from experiments.devices import device_label

    rows = results["rows"]
    lengths = sorted({r["tokens"] for r in rows})
    strategies = sorted({r["strategy"] for r in rows if r["context"] > 1}) or ["single"]
    fig, axes = plt.subplots(
        1, len(lengths), figsize=(4.2 * len(lengths), 3.8), sharey=True, squeeze=False
    )
    for ax, n in zip(axes[0], lengths):
        for s in strategies:
            pts = sorted(
                (r["context"], r["ratio_to_context_1"])
                for r in rows
                if r["tokens"] == n and (r["strategy"] == s or r["context"] == 1)
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.axhline(1.15, color="grey", ls="--", lw=1, label="target 1.15")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n // 1024}K tokens")
        ax.set_xlabel("context-parallel size N")
    axes[0][0].set_ylabel("prefill time / time at N=1 (lower is better)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(
        f"{results['model']} {results['dtype']} prefill on {device_label(results)}: ring overhead"
    )
    save_figure(path, fig)


def run_cp_overhead(
    lengths=(2048, 4096, 8192),
    contexts=(1, 2, 4, 8),
    strategies=STRATEGIES,
    repeats=MIN_REPEATS,
    model="smollm2-135m",
    dtype="float32",
    platform="cpu",
    out=os.path.join(HERE, "results", "cp_overhead.json"),
    figure=os.path.join(HERE, "figures", "cp_overhead.png"),
) -> dict:
    """Time prefill for every (length, context, strategy) on ``platform`` ("cpu" or "gpu",
    see ``experiments.devices``) ``repeats`` times; write JSON and a plot."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from cpjax.engine import Engine
    from cpjax.errors import require
    from cpjax.loaders import load_model
    from cpjax.names import DTYPES, check_choice
    from cpjax.parallel.comm import formula_bytes_per_layer
    from experiments.devices import check_devices, placement_on
    from experiments.provenance import write_results

    require(
        repeats >= MIN_REPEATS,
        f"repeats={repeats}: time each point at least {MIN_REPEATS} times (min/median/max)",
    )
    devices = check_devices(platform, contexts)
    config, params, _ = load_model(model)
    jdtype = jnp.dtype(check_choice("dtype", dtype, DTYPES))
    elem = jnp.dtype(jdtype).itemsize
    rng = np.random.default_rng(0)
    jobs = [(c, s) for c in contexts for s in (strategies if c > 1 else ("single",))]
    prompts = {n: rng.integers(3, config.vocab_size, n).astype(np.int32) for n in lengths}
    rows = []
    baseline = {}
    # One engine at a time (each holds a replica of the weights per device); context 1 first.
    jobs.sort(key=lambda job: job[0] != 1)
    with tqdm(total=len(lengths) * len(jobs), desc="cp_overhead") as bar:
        for context, strategy in jobs:
            engine = Engine(config, params, placement_on(context, strategy=strategy), dtype=jdtype)
            for n, ids in prompts.items():
                times = _time_prefill(engine, ids, repeats)
                seconds = statistics.median(times)
                if context == 1:
                    baseline[n] = seconds
                local = engine.prefill_slots(n) // context
                rows.append(
                    {
                        "tokens": n,
                        "context": context,
                        "strategy": strategy,
                        "seconds_min": min(times),
                        "seconds_median": seconds,
                        "seconds_max": max(times),
                        "tokens_per_s": n / seconds,
                        "ratio_to_context_1": seconds / baseline[n],
                        "bytes_sent_per_rank_per_layer": 0
                        if context == 1
                        else formula_bytes_per_layer(
                            strategy,
                            context,
                            local,
                            local,
                            config.n_heads,
                            config.n_kv_heads,
                            config.head_dim,
                            elem,
                        ),
                    }
                )
                bar.update(1)
            del engine
            jax.clear_caches()
    results = {
        "experiment": "cp_overhead",
        "model": config.name,
        "dtype": dtype,
        **devices,
        "jax": jax.__version__,
        "repeats": repeats,
        "rows": rows,
        "out": out,
        "figure": figure,
    }
    results = write_results(out, results)
    plot(results, figure)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Render the cp_overhead README table.")
    parser.add_argument("--table", action="store_true", help="print the markdown table")
    parser.add_argument("--results", default=os.path.join(HERE, "results", "cp_overhead.json"))
    args = parser.parse_args(argv)
    if not args.table:
        parser.error(
            "nothing to do: measure with `python -m experiments.run "
            "experiments/configs/cp_overhead.gin`, render with --table"
        )
    with open(args.results, encoding="utf-8") as f:
        print(table(json.load(f)))


if __name__ == "__main__":
    main()
