"""Where a single-device CPU prefill spends its time: attention vs the rest, ours vs torch's.

For an embedded model (fp32, one device), in one run:
* the prefill of a ``--tokens`` prompt as it is, and with attention replaced by a no-op that
  returns its queries (what the layers cost without attention); their difference is the
  attention's share;
* one layer's causal attention at that length (the model's heads) by ``blockwise.attend`` with
  several block shapes, next to ``torch.nn.functional.scaled_dot_product_attention`` (what HF
  transformers runs on CPU), each the median of ``--repeats`` timed calls after a warm-up,
  the two sides interleaved call by call.

Writes ``experiments/results/prefill_profile.json``.
Usage: ``python -m experiments.prefill_profile [--model smollm2-135m] [--tokens 2048]
[--repeats 5]`` (needs the ``oracle`` extra for the torch side).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpjax import dispatch
from cpjax.attention import blockwise
from cpjax.engine import Engine
from cpjax.loaders.embedded import EMBEDDED_MODELS
from cpjax.loaders.source import load_model
from experiments.bench_cpu import host_info
from experiments.provenance import write_results

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = ((256, 512), (256, 256), (512, 512), (128, 512))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _no_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **blocks):
    """Attention's shapes at no cost: ``(q, zeros)``."""
    return q, jnp.zeros(q.shape[:2], jnp.float32)


def prefill_seconds(config, params, tokens: int, repeats: int) -> dict:
    """Median seconds of a prefill with the default attention and with none, interleaved."""
    ids = np.random.default_rng(0).integers(3, config.vocab_size, tokens).astype(np.int32)
    default = dispatch.get_attention("blockwise")
    engines = {"with_attention": Engine(config, params, dtype=jnp.float32, attention="blockwise")}
    dispatch._IMPLS["blockwise"] = default._replace(attend=_no_attention)
    try:
        engines["without_attention"] = Engine(
            config, params, dtype=jnp.float32, attention="blockwise"
        )
    finally:
        dispatch._IMPLS["blockwise"] = default

    def run(engine):
        logits, _ = engine.prefill(ids, engine.new_cache(tokens + 64))
        jax.block_until_ready(logits)

    times = {name: [] for name in engines}
    for engine in engines.values():
        run(engine)
    for _ in range(repeats):
        for name, engine in engines.items():
            times[name].append(_seconds(lambda engine=engine: run(engine)))
    return {name: statistics.median(t) for name, t in times.items()}


def attention_ms(config, tokens: int, repeats: int) -> dict:
    """Median milliseconds of one layer's causal attention: ours by block shape, torch SDPA."""
    import torch

    rng = np.random.default_rng(0)
    hq, hkv, d = config.n_heads, config.n_kv_heads, config.head_dim
    q, k, v = (rng.standard_normal((tokens, h, d), np.float32) for h in (hq, hkv, hkv))
    pos, seg = np.arange(tokens, dtype=np.int32), np.zeros(tokens, np.int32)
    calls = {}
    for bq, bk in BLOCKS:
        fn = jax.jit(
            lambda q, k, v, bq=bq, bk=bk: blockwise.attend(
                q, k, v, pos, pos, seg, seg, block_q=bq, block_k=bk
            )
        )
        args = [jnp.asarray(x) for x in (q, k, v)]
        calls[f"blockwise_{bq}x{bk}"] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    tq, tk, tv = (torch.from_numpy(x).transpose(0, 1)[None] for x in (q, k, v))
    tk, tv = (x.repeat_interleave(hq // hkv, 1) for x in (tk, tv))

    def sdpa():
        with torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    calls["torch_sdpa"] = sdpa
    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(_seconds(call))
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=EMBEDDED_MODELS, default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "prefill_profile.json"))
    args = parser.parse_args(argv)
    config, params, _ = load_model(args.model)
    prefill = prefill_seconds(config, params, args.tokens, args.repeats)
    layer = attention_ms(config, args.tokens, args.repeats)
    results = {
        "experiment": "prefill_profile",
        "model": config.name,
        "dtype": "float32",
        "tokens": args.tokens,
        "repeats": args.repeats,
        "machine": host_info(),
        "prefill_seconds": prefill,
        "attention_share": 1 - prefill["without_attention"] / prefill["with_attention"],
        "attention_ms_per_layer": layer,
        "layers": config.n_layers,
    }
    results = write_results(args.out, results)
    print({k: results[k] for k in ("prefill_seconds", "attention_share", "attention_ms_per_layer")})
    return results


if __name__ == "__main__":
    main()
