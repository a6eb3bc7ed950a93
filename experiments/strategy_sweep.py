"""pass-KV vs pass-Q partial prefill over a grid of (new tokens T, cached tokens P).

On the fake CPU mesh: for each cached length P, one cache is prefilled, then a partial prefill
of T new tokens is timed with each ring (on a fresh copy of the cache each time). Records the
faster ring and the heuristic's choice (``cpjax.parallel.heuristic`` with this machine's
calibrated figures, ``cpjax.hardware.calibrate_cpu``) and the agreement rate.
Run: ``python -m experiments.run experiments/configs/strategy_sweep.gin`` (on GPUs:
``strategy_sweep_gpu.gin``, which binds ``platform = 'gpu'``).
"""

from __future__ import annotations

import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cpjax.io import save_figure
    from experiments.devices import device_label

    rows = results["rows"]
    news = sorted({r["new_tokens"] for r in rows})
    cached = sorted({r["cached_tokens"] for r in rows})
    ratio = np.full((len(cached), len(news)), np.nan)
    for r in rows:
        ratio[cached.index(r["cached_tokens"]), news.index(r["new_tokens"])] = (
            r["seconds"]["pass_kv"] / r["seconds"]["pass_q"]
        )
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    limit = max(1.05, float(np.nanmax(np.maximum(ratio, 1 / ratio))))
    image = ax.imshow(ratio, cmap="coolwarm", origin="lower", vmin=1 / limit, vmax=limit)
    for r in rows:
        i, j = cached.index(r["cached_tokens"]), news.index(r["new_tokens"])
        mark = "" if r["heuristic"] == r["faster"] else "  ✗"
        ax.text(
            j,
            i,
            f"{ratio[i, j]:.2f}\n{r['heuristic'].replace('pass_', '')}{mark}",
            ha="center",
            va="center",
            fontsize=8,
        )
    ax.set_xticks(range(len(news)), [str(t) for t in news])
    ax.set_yticks(range(len(cached)), [str(p) for p in cached])
    ax.set_xlabel("new tokens T")
    ax.set_ylabel("cached tokens P")
    fig.colorbar(image, label="time pass-KV / time pass-Q (>1: pass-Q faster)")
    ax.set_title(
        f"{results['model']} {results['dtype']}, CP{results['context']} on "
        f"{device_label(results)}; text = heuristic's choice\n"
        f"agreement {results['agreement']:.0%} (✗ = disagrees)",
        fontsize=9,
    )
    save_figure(path, fig)


def run_strategy_sweep(
    new_tokens=(64, 512, 2048),
    cached_tokens=(0, 1024, 6144),
    context=8,
    repeats=2,
    model="smollm2-135m",
    dtype="float32",
    hardware="cpu",
    platform="cpu",
    out=os.path.join(HERE, "results", "strategy_sweep.json"),
    figure=os.path.join(HERE, "figures", "strategy_sweep.png"),
) -> dict:
    """Time both rings for every (T, P) on ``context`` devices of ``platform`` ("cpu" or
    "gpu", see ``experiments.devices``); ``hardware`` is the heuristic's preset or "cpu"
    (calibrated here). Writes JSON and a plot."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from cpjax.engine import ContextParallel, Engine
    from cpjax.hardware import get_hardware
    from cpjax.loaders import load_model
    from cpjax.names import DTYPES, HEURISTIC_CHOICES, check_choice
    from cpjax.parallel.heuristic import explain_strategy
    from cpjax.parallel.mesh import make_mesh
    from experiments.devices import check_devices
    from experiments.provenance import write_results

    devices = check_devices(platform, [context])
    config, params, _ = load_model(model)
    jdtype = jnp.dtype(check_choice("dtype", dtype, DTYPES))
    mesh = make_mesh(context)
    engines = {
        strategy: Engine(config, params, ContextParallel(mesh, strategy=strategy), dtype=jdtype)
        for strategy in HEURISTIC_CHOICES
    }
    engine = engines["pass_kv"]  # prefills the cached part; its caches serve both engines
    figures = get_hardware(hardware)
    rng = np.random.default_rng(0)
    capacity = max(engine.prefill_slots(p) if p else 0 for p in cached_tokens) + max(
        engine.prefill_slots(t) for t in new_tokens
    )
    rows = []
    with tqdm(total=len(cached_tokens) * len(new_tokens) * 2, desc="strategy_sweep") as bar:
        for p in cached_tokens:
            base = engine.new_cache(capacity)
            if p:
                _, base = engine.prefill(
                    rng.integers(3, config.vocab_size, p).astype(np.int32), base
                )
            for t in new_tokens:
                ids = rng.integers(3, config.vocab_size, t).astype(np.int32)
                seconds = {}
                for strategy, ring_engine in engines.items():

                    def once(ring_engine=ring_engine, ids=ids, base=base, p=p):
                        cache = jax.tree.map(jnp.copy, base)
                        jax.block_until_ready(cache)
                        start = time.perf_counter()
                        jax.block_until_ready(ring_engine.prefill(ids, cache, start_position=p))
                        return time.perf_counter() - start

                    once()  # compile
                    seconds[strategy] = statistics.median(once() for _ in range(repeats))
                    bar.update(1)
                choice = explain_strategy(
                    t, p, config, context, figures, bytes_per_element=jnp.dtype(jdtype).itemsize
                )
                faster = min(seconds, key=seconds.get)
                rows.append(
                    {
                        "new_tokens": t,
                        "cached_tokens": p,
                        "seconds": seconds,
                        "faster": faster,
                        "heuristic": choice.strategy,
                        "heuristic_reason": choice.reason,
                    }
                )
    agreement = sum(r["faster"] == r["heuristic"] for r in rows) / len(rows)
    results = {
        "experiment": "strategy_sweep",
        "model": config.name,
        "dtype": dtype,
        "context": context,
        **devices,
        "jax": jax.__version__,
        "hardware": figures.__dict__,
        "repeats": repeats,
        "agreement": agreement,
        "rows": rows,
        "out": out,
        "figure": figure,
    }
    results = write_results(out, results)
    plot(results, figure)
    return results
