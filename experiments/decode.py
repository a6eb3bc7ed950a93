"""Decode tokens/s vs cached context length and mesh size, for both context-parallel decodes.

``allreduce`` (replicated query, one merge collective) and ``ring_pass_q`` (the paper's batched
ring pass-Q decode) on fake CPU meshes of 1..8 devices, next to the single-device engine. The
cache is filled with synthetic keys/values (decode cost does not depend on their values), laid
out as a context-parallel prefill would leave it, so long contexts need no long prefill.
Run: ``python -m experiments.run experiments/configs/decode.gin`` (on GPUs: ``decode_gpu.gin``,
which binds ``platform = 'gpu'``).
"""

from __future__ import annotations

import os
import time

from cpjax.names import DECODE_STRATEGIES

HERE = os.path.dirname(os.path.abspath(__file__))


def filled_cache(engine, cached_tokens: int, capacity: int, seed: int = 0):
    """A cache of ``capacity`` holding ``cached_tokens`` random K/V of sequence 0, spread over
    the ranks as a balanced prefill leaves them (every rank ``ceil(P / N)`` or fewer)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cpjax.attention.masks import PAD_SEGMENT

    cache = engine.new_cache(capacity)
    n = engine.placement.n_ranks
    per_rank = cache.capacity // n
    rng = np.random.default_rng(seed)
    pos = np.zeros(cache.capacity, np.int32)
    seg = np.full(cache.capacity, PAD_SEGMENT, np.int32)
    order = rng.permutation(cached_tokens)
    fills = []
    for r, chunk in enumerate(np.array_split(order, n)):
        pos[r * per_rank : r * per_rank + chunk.size] = chunk
        seg[r * per_rank : r * per_rank + chunk.size] = 0
        fills.append(chunk.size)
    k = rng.standard_normal(cache.k.shape, np.float32) * 0.5
    filled = cache._replace(k=k, v=-k, pos=pos, seg=seg, fill=np.asarray(fills, np.int32))
    # Each array where the engine's own empty cache lives (one device, or sharded over ranks).
    return jax.tree.map(
        lambda x, like: jax.device_put(jnp.asarray(x, like.dtype), like.sharding), filled, cache
    )


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpjax.io import save_figure
    from experiments.devices import device_label

    rows = results["rows"]
    contexts = sorted({r["cached_tokens"] for r in rows})
    fig, axes = plt.subplots(
        1, len(contexts), figsize=(4.2 * len(contexts), 3.8), sharey=True, squeeze=False
    )
    for ax, p in zip(axes[0], contexts):
        for strategy, marker in (("allreduce", "o"), ("ring_pass_q", "s")):
            pts = sorted(
                (r["context"], r["ms_per_token"])
                for r in rows
                if r["cached_tokens"] == p and r["strategy"] in (strategy, "single")
            )
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{p // 1024}K cached tokens")
        ax.set_xlabel("context-parallel size N")
    axes[0][0].set_ylabel("ms per decoded token (lower is better)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(
        f"{results['model']} {results['dtype']} greedy decode, batch "
        f"{results['batch']}, {device_label(results)}"
    )
    save_figure(path, fig)


def run_decode(
    cached_tokens=(1024, 4096, 16384),
    contexts=(1, 2, 4, 8),
    strategies=DECODE_STRATEGIES,
    steps=16,
    batch=1,
    model="smollm2-135m",
    dtype="float32",
    platform="cpu",
    out=os.path.join(HERE, "results", "decode.json"),
    figure=os.path.join(HERE, "figures", "decode.png"),
) -> dict:
    """Time ``steps`` decode steps for every (context, strategy, cached length) on
    ``platform`` ("cpu" or "gpu", see ``experiments.devices``); write JSON and a plot."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from cpjax.engine import Engine
    from cpjax.loaders import load_model
    from cpjax.names import DTYPES, check_choice
    from experiments.devices import check_devices, placement_on
    from experiments.provenance import write_results

    devices = check_devices(platform, contexts)
    config, params, _ = load_model(model)
    jdtype = jnp.dtype(check_choice("dtype", dtype, DTYPES))
    jobs = [(c, s) for c in contexts for s in (strategies if c > 1 else ("single",))]
    rows = []
    with tqdm(total=len(jobs) * len(cached_tokens), desc="decode") as bar:
        for context, strategy in jobs:
            engine = Engine(
                config, params, placement_on(context, decode_strategy=strategy), dtype=jdtype
            )
            for p in cached_tokens:
                capacity = p + context * (steps + 2) * batch + 64
                cache = filled_cache(engine, p, capacity)
                tokens = np.arange(batch, dtype=np.int32) + 7
                positions = np.full(batch, p, np.int32)
                segments = np.zeros(batch, np.int32)  # same cost as distinct sequences
                _, tokens, cache = engine.decode(tokens, positions, segments, 0, cache)  # compile
                jax.block_until_ready(tokens)
                start = time.perf_counter()
                for step in range(1, steps + 1):
                    _, tokens, cache = engine.decode(
                        tokens, positions + step, segments, step, cache
                    )
                jax.block_until_ready(tokens)
                seconds = (time.perf_counter() - start) / steps
                rows.append(
                    {
                        "cached_tokens": p,
                        "context": context,
                        "strategy": strategy,
                        "ms_per_token": 1e3 * seconds,
                        "tokens_per_s": batch / seconds,
                    }
                )
                bar.update(1)
            del engine, cache
            jax.clear_caches()
    results = {
        "experiment": "decode",
        "model": config.name,
        "dtype": dtype,
        "batch": batch,
        "steps": steps,
        **devices,
        "jax": jax.__version__,
        "rows": rows,
        "out": out,
        "figure": figure,
    }
    results = write_results(out, results)
    plot(results, figure)
    return results
