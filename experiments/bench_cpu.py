"""cpjax vs HF transformers on CPU, same machine, same prompt, fp32 (an embedded model).

Measures, side by side in one run, each ``--repeats`` times after a warm-up (min/median/max):
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


def _times(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one warm-up call (compilation, allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _rates(n: int, fn, repeats: int) -> dict:
    """Spread of ``n / seconds`` over ``repeats`` timed calls of ``fn``."""
    return spread(n / t for t in _times(fn, repeats))


def _prompt(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, n).astype(np.int32)


def bench_cpjax(engine: Engine, lengths, decode_tokens: int, repeats: int) -> dict:
    result = {"prefill_tok_s": {}, "decode_tok_s": None}
    for n in lengths:
        ids = _prompt(n, engine.config.vocab_size)

        def run(ids=ids, n=n):
            logits, cache = engine.prefill(ids, engine.new_cache(n + 64))
            jax.block_until_ready(logits)

        result["prefill_tok_s"][str(n)] = _rates(n, run, repeats)
    ids = _prompt(128, engine.config.vocab_size, seed=1)

    def decode_rate():
        stream = engine.generate_stream(ids, decode_tokens + 1)
        next(stream)  # prefill + first token
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - start)

    decode_rate()  # warm-up
    result["decode_tok_s"] = spread(decode_rate() for _ in range(repeats))
    return result


def bench_hf(model_name: str, lengths, decode_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path() if model_name == "smollm2-135m" else gemma_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    vocab = model.config.vocab_size
    result = {
        "prefill_tok_s": {},
        "decode_tok_s": None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with torch.inference_mode():
        for n in lengths:
            ids = torch.from_numpy(_prompt(n, vocab)).long()[None]
            result["prefill_tok_s"][str(n)] = _rates(
                n, lambda ids=ids: model(ids, logits_to_keep=1, use_cache=True), repeats
            )
        ids = torch.from_numpy(_prompt(128, vocab, seed=1)).long()[None]
        prefill = statistics.median(
            _times(lambda: model(ids, logits_to_keep=1, use_cache=True), repeats)
        )

        def generate():
            model.generate(
                ids,
                max_new_tokens=decode_tokens + 1,
                min_new_tokens=decode_tokens + 1,
                do_sample=False,
                pad_token_id=0,
            )

        result["decode_tok_s"] = spread(
            decode_tokens / max(total - prefill, 1e-9) for total in _times(generate, repeats)
        )
    return result


def _errors(rates: list) -> np.ndarray:
    """``[2, n]`` distances from each median down to the min and up to the max."""
    return np.array(
        [[r["median"] - r["min"] for r in rates], [r["max"] - r["median"] for r in rates]]
    )


def ratios(cpjax: dict, hf: dict) -> dict:
    """cpjax / HF rate ratios: of the medians, and the range the spreads allow."""

    def ratio(a: dict, b: dict) -> dict:
        return {
            "median": a["median"] / b["median"],
            "min": a["min"] / b["max"],
            "max": a["max"] / b["min"],
        }

    return {
        "prefill": {
            n: ratio(cpjax["prefill_tok_s"][n], hf["prefill_tok_s"][n])
            for n in cpjax["prefill_tok_s"]
        },
        "decode": ratio(cpjax["decode_tok_s"], hf["decode_tok_s"]),
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
    results = {
        "benchmark": "bench_cpu",
        "model": config.name,
        "dtype": "float32",
        "repeats": args.repeats,
        "machine": host_info(),
        "cpjax": bench_cpjax(engine, args.lengths, args.decode_tokens, args.repeats),
    }
    results["hf_transformers"] = bench_hf(
        args.model, args.lengths, args.decode_tokens, args.repeats
    )
    results["ratios"] = ratios(results["cpjax"], results["hf_transformers"])
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
