"""cpjax vs HF transformers on CPU, same machine, same prompt, fp32 (an embedded model).

Measures, side by side in one run, ``--repeats`` rounds after a warm-up (min/median/max); in a
round each measurement runs once on each side, back to back (order alternating by round), and
the ratios pair the two runs of a round, so a drift of a shared host's speed cancels:
* prefill tokens/s at each prompt length (last-token logits only, on both sides);
* greedy decode tokens/s for ``--decode-tokens`` new tokens after a short prompt, and the weight
  bytes per second that rate implies (decode reads every weight once per token) next to the
  machine's memory bandwidth (a STREAM-like numpy copy).

Records the host (CPU model, its vector extensions, cores), the XLA flags in force, the jax and
torch versions and the commit: the ratio depends on the host.

Writes ``experiments/results/bench_cpu.json`` and ``experiments/figures/bench_cpu.png``
(``bench_cpu_gemma3-270m.*`` for ``--model gemma3-270m``).
Usage: ``python -m experiments.bench_cpu [--model smollm2-135m|gemma3-270m] [--lengths 2048 6144]
[--repeats 3]``
(needs the ``oracle`` extra: transformers + CPU torch).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cpjax.engine import Engine
from cpjax.io import save_figure
from cpjax.loaders.embedded import EMBEDDED_MODELS, embedded_gguf_path, gemma_gguf_path
from cpjax.loaders.source import load_model
from cpjax.model.decoder import param_count
from experiments.provenance import write_results

HERE = os.path.dirname(os.path.abspath(__file__))


#: Vector extensions worth naming for a CPU GEMM (from the ``flags`` line of /proc/cpuinfo).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def host_info() -> dict:
    """The machine a result holds for: CPU model and vector extensions, cores, memory
    bandwidth, platform, jax version and the XLA flags in force."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: no flags
        pass
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "vector_flags": [f for f in VECTOR_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "memory_copy_gb_s": copy_bandwidth_gb_s(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def copy_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Best of ``repeats`` numpy copies of a ``megabytes`` float32 array, counted as STREAM
    does (bytes read + bytes written per second), in GB/s."""
    src = np.ones(megabytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def spread(values) -> dict:
    """``{"min", "median", "max"}`` of ``values``."""
    values = list(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _prompt(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, n).astype(np.int32)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpjax_runs(engine: Engine, lengths, decode_tokens: int) -> dict:
    """One timed run of each measurement, by name: ``prefill_<n>`` and ``decode``, each a
    callable returning tokens/s."""
    runs = {}
    for n in lengths:
        ids = _prompt(n, engine.config.vocab_size)

        def prefill(ids=ids, n=n):
            def once():
                logits, _ = engine.prefill(ids, engine.new_cache(n + 64))
                jax.block_until_ready(logits)

            return n / _seconds(once)

        runs[f"prefill_{n}"] = prefill
    ids = _prompt(128, engine.config.vocab_size, seed=1)

    def decode():
        stream = engine.generate_stream(ids, decode_tokens + 1)
        next(stream)  # prefill + first token
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - start)

    runs["decode"] = decode
    return runs


def hf_runs(model_name: str, lengths, decode_tokens: int) -> tuple[dict, dict]:
    """The same measurements for HF transformers (last-token logits only in prefill; decode
    is ``generate``'s time less the median of three 128-token prefills), and its versions."""
    import torch
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path() if model_name == "smollm2-135m" else gemma_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    vocab = model.config.vocab_size
    info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}

    def forward(ids):
        with torch.inference_mode():
            model(ids, logits_to_keep=1, use_cache=True)

    runs = {}
    for n in lengths:
        ids = torch.from_numpy(_prompt(n, vocab)).long()[None]
        runs[f"prefill_{n}"] = lambda ids=ids, n=n: n / _seconds(lambda: forward(ids))
    ids = torch.from_numpy(_prompt(128, vocab, seed=1)).long()[None]
    forward(ids)
    prefill = statistics.median(_seconds(lambda: forward(ids)) for _ in range(3))

    def decode():
        def generate():
            with torch.inference_mode():
                model.generate(
                    ids,
                    max_new_tokens=decode_tokens + 1,
                    min_new_tokens=decode_tokens + 1,
                    do_sample=False,
                    pad_token_id=0,
                )

        return decode_tokens / max(_seconds(generate) - prefill, 1e-9)

    runs["decode"] = decode
    return runs, info


def interleaved(sides: dict, repeats: int, progress=None) -> dict:
    """``{side: {measurement: [rates]}}``: every measurement of every side run once as a
    warm-up, then ``repeats`` rounds in which each measurement runs once per side, back to
    back, the sides' order alternating by round, so that a drift of the host's speed (other
    tenants, clocks) reaches both sides alike."""
    names = list(sides)
    measurements = list(sides[names[0]])
    for name in names:
        for run in sides[name].values():
            run()
    rates = {name: {m: [] for m in measurements} for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for m in measurements:
            for name in order:
                rates[name][m].append(sides[name][m]())
        if progress is not None:
            progress.update(1)
    return rates


def side_summary(rates: dict) -> dict:
    """One side's spreads: ``prefill_tok_s`` by prompt length and ``decode_tok_s``."""
    return {
        "prefill_tok_s": {
            m.split("_", 1)[1]: spread(r) for m, r in rates.items() if m.startswith("prefill_")
        },
        "decode_tok_s": spread(rates["decode"]),
    }


def _errors(rates: list) -> np.ndarray:
    """``[2, n]`` distances from each median down to the min and up to the max."""
    return np.array(
        [[r["median"] - r["min"] for r in rates], [r["max"] - r["median"] for r in rates]]
    )


def paired_ratios(cpjax: dict, hf: dict) -> dict:
    """cpjax / HF rate ratios of the runs made back to back (round ``i`` of each side):
    their min, median and max."""
    pair = lambda m: spread(a / b for a, b in zip(cpjax[m], hf[m]))  # noqa: E731
    return {
        "prefill": {m.split("_", 1)[1]: pair(m) for m in cpjax if m.startswith("prefill_")},
        "decode": pair("decode"),
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lengths = list(results["cpjax"]["prefill_tok_s"])
    x = np.arange(len(lengths))
    for offset, name in ((-0.2, "cpjax"), (0.2, "hf_transformers")):
        rates = [results[name]["prefill_tok_s"][n] for n in lengths]
        axes[0].bar(x + offset, [r["median"] for r in rates], 0.4, label=name, yerr=_errors(rates))
    axes[0].set_xticks(x, [f"{int(n) // 1024}K" if int(n) >= 1024 else n for n in lengths])
    axes[0].set_xlabel("prompt tokens")
    axes[0].set_ylabel("prefill tokens/s (higher is better)")
    axes[0].legend()
    names = ["cpjax", "hf_transformers"]
    rates = [results[n]["decode_tok_s"] for n in names]
    axes[1].bar(names, [r["median"] for r in rates], color=["C0", "C1"], yerr=_errors(rates))
    axes[1].set_ylabel("greedy decode tokens/s")
    host = results["machine"]
    fig.suptitle(
        f"{results['model']} fp32 on {host['cpu_count']} cores of {host['cpu_model']} "
        f"(median, bars min-max of {results['repeats']})"
    )
    save_figure(path, fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=EMBEDDED_MODELS, default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="default: experiments/results/bench_cpu[_MODEL].json")
    parser.add_argument("--figure", help="default: experiments/figures/bench_cpu[_MODEL].png")
    args = parser.parse_args(argv)
    stem = "bench_cpu" if args.model == "smollm2-135m" else f"bench_cpu_{args.model}"
    out = args.out or os.path.join(HERE, "results", f"{stem}.json")
    figure = args.figure or os.path.join(HERE, "figures", f"{stem}.png")

    config, params, _ = load_model(args.model)
    engine = Engine(config, params, dtype=jnp.float32)
    hf, hf_info = hf_runs(args.model, args.lengths, args.decode_tokens)
    sides = {"cpjax": cpjax_runs(engine, args.lengths, args.decode_tokens), "hf_transformers": hf}
    with tqdm(total=args.repeats, desc="rounds (both sides)") as progress:
        rates = interleaved(sides, args.repeats, progress)
    results = {
        "benchmark": "bench_cpu",
        "model": config.name,
        "dtype": "float32",
        "repeats": args.repeats,
        "method": "interleaved: per round each measurement runs once per side, back to back, "
        "the sides' order alternating; ratios pair the two runs of a round",
        "machine": host_info(),
        "cpjax": side_summary(rates["cpjax"]),
        "hf_transformers": {**side_summary(rates["hf_transformers"]), **hf_info},
        "ratios": paired_ratios(rates["cpjax"], rates["hf_transformers"]),
    }
    weight_gb = param_count(config) * 4 / 1e9  # fp32: every weight read once per decode token
    results["decode_weight_gb_s"] = {
        name: results[name]["decode_tok_s"]["median"] * weight_gb
        for name in ("cpjax", "hf_transformers")
    }
    results = write_results(out, results)
    plot(results, figure)
    print(results["ratios"])
    return results


if __name__ == "__main__":
    main()
