"""cpjax vs HF transformers on CPU, same machine, same prompt, fp32 (an embedded model).

Measures, side by side in one run:
* prefill tokens/s at each prompt length (last-token logits only, on both sides);
* greedy decode tokens/s for ``--decode-tokens`` new tokens after a short prompt.

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
from experiments.provenance import write_results

HERE = os.path.dirname(os.path.abspath(__file__))


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prompt(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, n).astype(np.int32)


def bench_cpjax(engine: Engine, lengths, decode_tokens: int, repeats: int) -> dict:
    result = {"prefill_tok_s": {}, "decode_tok_s": None}
    for n in lengths:
        ids = _prompt(n, engine.config.vocab_size)

        def run(ids=ids, n=n):
            logits, cache = engine.prefill(ids, engine.new_cache(n + 64))
            jax.block_until_ready(logits)

        result["prefill_tok_s"][str(n)] = n / _median_time(run, repeats)
    ids = _prompt(128, engine.config.vocab_size, seed=1)

    def decode_rate():
        stream = engine.generate_stream(ids, decode_tokens + 1)
        next(stream)  # prefill + first token
        start = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - start)

    decode_rate()  # warm-up
    result["decode_tok_s"] = statistics.median(decode_rate() for _ in range(repeats))
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
            result["prefill_tok_s"][str(n)] = n / _median_time(
                lambda ids=ids: model(ids, logits_to_keep=1, use_cache=True), repeats
            )
        ids = torch.from_numpy(_prompt(128, vocab, seed=1)).long()[None]
        prefill = _median_time(lambda: model(ids, logits_to_keep=1, use_cache=True), repeats)

        def generate():
            model.generate(
                ids,
                max_new_tokens=decode_tokens + 1,
                min_new_tokens=decode_tokens + 1,
                do_sample=False,
                pad_token_id=0,
            )

        total = _median_time(generate, repeats)
        result["decode_tok_s"] = decode_tokens / max(total - prefill, 1e-9)
    return result


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    lengths = list(results["cpjax"]["prefill_tok_s"])
    x = np.arange(len(lengths))
    for offset, name in ((-0.2, "cpjax"), (0.2, "hf_transformers")):
        axes[0].bar(
            x + offset, [results[name]["prefill_tok_s"][n] for n in lengths], 0.4, label=name
        )
    axes[0].set_xticks(x, [f"{int(n) // 1024}K" if int(n) >= 1024 else n for n in lengths])
    axes[0].set_xlabel("prompt tokens")
    axes[0].set_ylabel("prefill tokens/s (higher is better)")
    axes[0].legend()
    names = ["cpjax", "hf_transformers"]
    axes[1].bar(names, [results[n]["decode_tok_s"] for n in names], color=["C0", "C1"])
    axes[1].set_ylabel("greedy decode tokens/s")
    fig.suptitle(f"{results['model']} fp32 on {results['machine']['cpu_count']} CPU cores")
    save_figure(path, fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=EMBEDDED_MODELS, default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 6144])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
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
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
        },
        "cpjax": bench_cpjax(engine, args.lengths, args.decode_tokens, args.repeats),
    }
    results["hf_transformers"] = bench_hf(
        args.model, args.lengths, args.decode_tokens, args.repeats
    )
    results["ratios"] = {
        "prefill": {
            n: results["cpjax"]["prefill_tok_s"][n] / results["hf_transformers"]["prefill_tok_s"][n]
            for n in results["cpjax"]["prefill_tok_s"]
        },
        "decode": results["cpjax"]["decode_tok_s"] / results["hf_transformers"]["decode_tok_s"],
    }
    results = write_results(out, results)
    plot(results, figure)
    print(results["ratios"])
    return results


if __name__ == "__main__":
    main()
