"""Ring overhead of context-parallel prefill on fake CPU devices (gin-configurable).

The fake devices share the machine's cores, so a CP run cannot be faster than the single-device
run; the ratio ``time(context=N) / time(context=1)`` measures what the ring, the layout and the
smaller per-device matmuls cost. Also records the bytes each rank sends per layer (formula of
``cpjax.parallel.comm``, checked against the compiled HLO in the tests).

Run: ``python -m experiments.run experiments/configs/cp_overhead.gin
[--gin "run_cp_overhead.lengths = [2048]"]``. Writes ``experiments/results/cp_overhead.json``
and ``experiments/figures/cp_overhead.png``. On GPUs: ``cp_overhead_gpu.gin`` (it binds
``platform = 'gpu'``).
"""

from __future__ import annotations

import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _time_prefill(engine, ids, repeats: int) -> float:
    import jax

    def once():
        logits, cache = engine.prefill(ids, engine.new_cache(engine.prefill_slots(ids.size)))
        jax.block_until_ready((logits, cache))

    once()   # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpjax.io import save_figure
    from experiments.devices import device_label

    rows = results["rows"]
    lengths = sorted({r["tokens"] for r in rows})
    strategies = sorted({r["strategy"] for r in rows if r["context"] > 1}) or ["single"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), sharey=True,
                             squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for s in strategies:
            pts = sorted((r["context"], r["ratio_to_context_1"]) for r in rows
                         if r["tokens"] == n and (r["strategy"] == s or r["context"] == 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.axhline(1.15, color="grey", ls="--", lw=1, label="target 1.15")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n // 1024}K tokens")
        ax.set_xlabel("context-parallel size N")
    axes[0][0].set_ylabel("prefill time / time at N=1 (lower is better)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{results['model']} {results['dtype']} prefill on {device_label(results)}: "
                 f"ring overhead")
    save_figure(path, fig)


def run_cp_overhead(lengths=(2048, 4096, 8192), contexts=(1, 2, 4, 8),
                    strategies=("pass_kv", "pass_q", "all_gather"), repeats=2,
                    model="smollm2-135m", dtype="float32", platform="cpu",
                    out=os.path.join(HERE, "results", "cp_overhead.json"),
                    figure=os.path.join(HERE, "figures", "cp_overhead.png")) -> dict:
    """Time prefill for every (length, context, strategy) on ``platform`` ("cpu" or "gpu",
    see ``experiments.devices``); write JSON and a plot."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from cpjax.engine import Engine
    from cpjax.engine import ContextParallel, Engine
    from cpjax.io import write_json
    from cpjax.loaders import load_model
    from cpjax.parallel.comm import formula_bytes_per_layer
    from cpjax.parallel.mesh import make_mesh
    from experiments.devices import check_devices

    devices = check_devices(platform, contexts)
    config, params, _ = load_model(model)
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
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
            engine = (Engine(config, params, dtype=jdtype) if context == 1 else
                      Engine(config, params, ContextParallel(mesh=make_mesh(context), strategy=strategy), dtype=jdtype))
            for n, ids in prompts.items():
                seconds = _time_prefill(engine, ids, repeats)
                if context == 1:
                    baseline[n] = seconds
                local = engine.prefill_slots(n) // context
                rows.append({
                    "tokens": n, "context": context, "strategy": strategy,
                    "seconds": seconds, "tokens_per_s": n / seconds,
                    "ratio_to_context_1": seconds / baseline[n],
                    "bytes_sent_per_rank_per_layer": 0 if context == 1 else
                    formula_bytes_per_layer(strategy, context, local, local, config.n_heads,
                                            config.n_kv_heads, config.head_dim, elem),
                })
                bar.update(1)
            del engine
            jax.clear_caches()
    results = {"experiment": "cp_overhead", "model": config.name, "dtype": dtype,
               **devices, "jax": jax.__version__, "repeats": repeats, "rows": rows, "out": out,
               "figure": figure}
    write_json(out, results)
    plot(results, figure)
    return results
