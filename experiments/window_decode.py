"""Decode time vs context for sliding-window and global layers (Gemma 3 270M, one CPU device).

The same weights run three ways: as published (15 sliding layers with a 512-token window, 3
global), with every layer sliding, and with every layer global. A sliding layer's decode step
attends at most the last W cached tokens (the blockwise attention skips the cache blocks outside
the window), so its time stays flat as the context grows; a global layer's grows with it.

Writes ``experiments/results/window_decode.json`` and ``experiments/figures/window_decode.png``.
Usage: ``python -m experiments.window_decode [--contexts 1024 4096 16384] [--tokens 16]``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from cpjax.engine import Engine
from cpjax.io import save_figure
from cpjax.loaders.source import load_model
from experiments.provenance import write_results

HERE = os.path.dirname(os.path.abspath(__file__))


def decode_ms_per_token(engine: Engine, context: int, tokens: int) -> float:
    """Milliseconds per greedy decode step after a ``context``-token prompt (prefill excluded)."""
    ids = np.random.default_rng(0).integers(3, engine.config.vocab_size, context).astype(np.int32)
    stream = engine.generate_stream(ids, tokens + 2)
    next(stream)  # prefill and the first token
    next(stream)  # the first decode step compiles
    start = time.perf_counter()
    count = sum(1 for _ in stream)
    return 1000 * (time.perf_counter() - start) / count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "window_decode.json"))
    parser.add_argument("--figure", default=os.path.join(HERE, "figures", "window_decode.png"))
    args = parser.parse_args(argv)

    config, params, _ = load_model("gemma3-270m")
    variants = {
        "published (15 sliding + 3 global)": config,
        "all sliding (W=512)": dataclasses.replace(config, layer_types=("sliding",) * 18),
        "all global": dataclasses.replace(config, layer_types=("full",) * 18),
    }
    ms = {name: {} for name in variants}
    for name, variant in variants.items():
        engine = Engine(variant, params)
        for context in args.contexts:
            ms[name][str(context)] = decode_ms_per_token(engine, context, args.tokens)
            print(name, context, f"{ms[name][str(context)]:.1f} ms/token", flush=True)
    results = write_results(
        args.out,
        {
            "benchmark": "window_decode",
            "model": config.name,
            "window": config.sliding_window,
            "decode_ms_per_token": ms,
        },
    )
    plot(results, args.figure)
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_context in results["decode_ms_per_token"].items():
        contexts = [int(c) for c in by_context]
        ax.plot(contexts, list(by_context.values()), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (cached tokens)")
    ax.set_ylabel("decode ms per token (lower is better)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{results['model']}: decode time vs context, one CPU device")
    ax.legend()
    save_figure(path, fig)


if __name__ == "__main__":
    main()
