"""Fine-tuning train step vs the number of context ranks N: tokens/s and memory per device.

One long sequence (``seq_len`` tokens, one document) is trained with
``cpjax.train.Trainer`` (SGD) on one device and on ``ContextParallel`` meshes of N ranks. Per N
it records the step time (one warm-up step, then the median of ``steps`` timed steps; tokens/s is
the real tokens over it) and the temporary memory per device of the compiled gradient program
(``Trainer.compiled_step_memory``: XLA's memory analysis, parameters and rows not counted), each
also as a ratio to N=1.

On fake CPU devices the N "devices" share the host's cores, so tokens/s does not grow with N
(the ranks take turns); memory per device is the meaningful metric there.

Run: ``python -m experiments.run experiments/configs/finetune.gin
[--gin "run_finetune.seq_len = 4096"]``. Writes ``experiments/results/finetune.json`` and
``experiments/figures/finetune.png``.
"""

from __future__ import annotations

import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 1024 * 1024
SHARED_CORES_NOTE = (
    "fake CPU devices share the host's {cpu_count} cores, so tokens/s does not speed up with "
    "N (the ranks take turns on the same cores); temporary memory per device is the "
    "meaningful metric here"
)


def _placement(context: int, strategy: str):
    """``SingleDevice(prefill_chunk=None)`` for one rank, else ``ContextParallel`` on a
    ``context`` x 1 mesh with ring ``strategy``."""
    from cpjax.engine import ContextParallel, SingleDevice
    from cpjax.parallel.mesh import make_mesh

    if context == 1:
        return SingleDevice(prefill_chunk=None)
    return ContextParallel(make_mesh(context), strategy=strategy)


def _time_steps(trainer, state, batches, steps: int):
    """One warm-up (compiling) step, then ``steps`` timed ones; returns ``(seconds of each
    timed step, real tokens a step, the last state)``."""
    import jax

    state, metrics = trainer.step(state, batches)
    jax.block_until_ready(state.params)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.step(state, batches)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - start)
    return times, metrics.n_tokens, state


def measure(config, params, tokens, context: int, strategy: str, remat: str, lr: float, steps):
    """One row: step times, tokens/s and temporary memory per device of training ``tokens``
    (``[1, S]``) on ``context`` ranks."""
    from cpjax.train import OptimizerConfig, Trainer, pack_batch

    trainer = Trainer(
        config, _placement(context, strategy), OptimizerConfig("sgd", lr), remat=remat
    )
    state = trainer.init_state(params)
    batch = pack_batch(tokens, vocab_size=config.vocab_size)
    temp_bytes = trainer.compiled_step_memory(state.params, batch)
    times, n_tokens, _ = _time_steps(trainer, state, [batch], steps)
    seconds = statistics.median(times)
    return {
        "context": context,
        "strategy": trainer.strategy_for(batch.tokens.size) if context > 1 else "single",
        "tokens": n_tokens,
        "seconds_min": min(times),
        "seconds_median": seconds,
        "seconds_max": max(times),
        "tokens_per_s": n_tokens / seconds,
        "temp_bytes_per_device": temp_bytes,
        "temp_mb_per_device": temp_bytes / MB,
    }


def add_ratios(rows: list) -> list:
    """``rows`` with tokens/s and memory as ratios to the N=1 row, and the ideal 1/N memory."""
    base = next(r for r in rows if r["context"] == 1)
    speed, memory = base["tokens_per_s"], base["temp_bytes_per_device"]
    return [
        {
            **r,
            "tokens_per_s_ratio_to_context_1": r["tokens_per_s"] / speed,
            "memory_ratio_to_context_1": r["temp_bytes_per_device"] / memory,
            "ideal_memory_ratio": 1 / r["context"],
        }
        for r in rows
    ]


def plot(results: dict, path: str) -> None:
    """Two panels vs N: tokens/s, and MB per device with the ideal 1/N line from N=1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpjax.io import save_figure
    from experiments.devices import device_label

    rows = sorted(results["rows"], key=lambda r: r["context"])
    contexts = [r["context"] for r in rows]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(9.5, 3.9))
    speed.plot(contexts, [r["tokens_per_s"] for r in rows], marker="o")
    speed.set_ylabel("train-step tokens/s (median)")
    mb = [r["temp_mb_per_device"] for r in rows]
    memory.plot(contexts, mb, marker="o", label="measured (XLA temp)")
    memory.plot(contexts, [mb[0] / c for c in contexts], ls="--", color="grey", label="ideal 1/N")
    memory.set_ylabel("temporary MB per device")
    memory.legend(fontsize=8)
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.set_xlabel("context ranks N")
        ax.set_ylim(bottom=0)
    shared = " (devices share the cores: no tokens/s speed-up)" if results["note"] else ""
    fig.suptitle(
        f"{results['model']} train step, {results['seq_len']} tokens, {results['strategy']}, "
        f"remat={results['remat']}, on {device_label(results)}{shared}",
        fontsize=10,
    )
    save_figure(path, fig)


def run_finetune(
    seq_len=8192,
    contexts=(1, 2, 4, 8),
    strategy="pass_kv",
    remat="full",
    steps=3,
    lr=1e-3,
    model="tiny",
    platform="cpu",
    out=os.path.join(HERE, "results", "finetune.json"),
    figure=os.path.join(HERE, "figures", "finetune.png"),
) -> dict:
    """Train one ``seq_len``-token sequence on each number of ranks in ``contexts`` (which must
    hold 1); write the JSON and the figure."""
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from cpjax.errors import require
    from cpjax.loaders import load_model
    from experiments.devices import check_devices
    from experiments.provenance import write_results

    contexts = sorted(contexts)
    require(1 in contexts, f"contexts={contexts}: need 1 (the baseline of the ratios)")
    require(steps >= 1, f"steps={steps}: time at least one step")
    devices = check_devices(platform, contexts)
    config, params, _ = load_model(model)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, seq_len))
    rows = []
    for context in tqdm(contexts, desc="finetune"):
        rows.append(measure(config, params, tokens, context, strategy, remat, lr, steps))
        jax.clear_caches()
    fake = platform == "cpu" and devices["device_count"] > 1
    results = {
        "experiment": "finetune",
        "model": config.name,
        "dtype": "float32",
        "seq_len": seq_len,
        "strategy": strategy,
        "remat": remat,
        "optimizer": {"name": "sgd", "lr": lr},
        "timed_steps": steps,
        **devices,
        "jax": jax.__version__,
        "note": SHARED_CORES_NOTE.format(cpu_count=devices["cpu_count"]) if fake else "",
        "rows": add_ratios(rows),
        "out": out,
        "figure": figure,
    }
    results = write_results(out, results)
    plot(results, figure)
    return results
