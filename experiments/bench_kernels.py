"""Attention kernel benchmark: Pallas flash/decode vs cuDNN vs XLA, side by side in one run.

Prefill: causal forward, ``Hq`` query heads / ``Hkv`` KV heads, head_dim ``D``, bf16, reported
in TFLOP/s (causal FLOPs = 2 * T^2 * Hq * D). Decode: one query token per head against a cache
of ``L`` tokens, reported as K/V bytes read per second and as a fraction of the device's
measured copy bandwidth.

GPU: ``python -m experiments.bench_kernels --platform gpu``
CPU smoke run (interpret mode, tiny shapes): ``python -m experiments.bench_kernels --smoke``
Writes ``experiments/results/bench_kernels_<platform>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _time(fn, *args, repeats: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _copy_bandwidth(n_bytes: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    return 2 * x.nbytes / _time(copy, x, repeats=repeats)


def bench_prefill(lengths, hq, hkv, d, dtype, repeats, interpret, platform):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cpjax.attention import blockwise
    from pallas_kernels import flash_attention

    rows = []
    for t in lengths:
        rng = np.random.default_rng(t)
        q = jnp.asarray(rng.standard_normal((t, hq, d)), dtype)
        k = jnp.asarray(rng.standard_normal((t, hkv, d)), dtype)
        v = jnp.asarray(rng.standard_normal((t, hkv, d)), dtype)
        pos = jnp.arange(t, dtype=jnp.int32)
        seg = jnp.zeros((t,), jnp.int32)
        flops = 2.0 * t * t * hq * d
        block_q, block_k = (16, 16) if interpret else (128, 64)
        impls = {
            "pallas": jax.jit(lambda *a: flash_attention(*a, block_q=block_q, block_k=block_k,
                                                         interpret=interpret)[0]),
            "blockwise_xla": jax.jit(lambda *a: blockwise.attend(*a)[0]),
        }
        if platform == "gpu":
            impls["cudnn"] = jax.jit(lambda q, k, v, *_: jax.nn.dot_product_attention(
                q[None], k[None], v[None], is_causal=True, implementation="cudnn")[0])
            if t <= 16384:   # the dense XLA path materialises Hq x T x T scores
                impls["xla_dense"] = jax.jit(lambda q, k, v, *_: jax.nn.dot_product_attention(
                    q[None], k[None], v[None], is_causal=True, implementation="xla")[0])
        for name, fn in impls.items():
            try:
                seconds = _time(fn, q, k, v, pos, pos, seg, seg, repeats=repeats)
                rows.append({"kind": "prefill", "impl": name, "tokens": t, "seconds": seconds,
                             "tflops": flops / seconds / 1e12})
            except Exception as exc:  # noqa: BLE001 - record why an implementation could not run
                rows.append({"kind": "prefill", "impl": name, "tokens": t,
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows


def bench_decode(cache_lengths, hq, hkv, d, dtype, repeats, interpret, bandwidth):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cpjax.attention import blockwise
    from pallas_kernels import decode_attention

    rows = []
    for length in cache_lengths:
        rng = np.random.default_rng(length)
        q = jnp.asarray(rng.standard_normal((1, hq, d)), dtype)
        k = jnp.asarray(rng.standard_normal((length, hkv, d)), dtype)
        v = jnp.asarray(rng.standard_normal((length, hkv, d)), dtype)
        kv_pos = jnp.arange(length, dtype=jnp.int32)
        kv_seg = jnp.zeros((length,), jnp.int32)
        q_pos = jnp.array([length], jnp.int32)
        q_seg = jnp.zeros((1,), jnp.int32)
        kv_bytes = 2 * k.nbytes
        impls = {
            "pallas_decode": jax.jit(lambda *a: decode_attention(
                *a, block_k=16 if interpret else 128, interpret=interpret)[0]),
            "blockwise_xla": jax.jit(lambda q, k, v, kp, ks, qp, qs: blockwise.attend(
                q, k, v, qp, kp, qs, ks)[0]),
        }
        for name, fn in impls.items():
            seconds = _time(fn, q, k, v, kv_pos, kv_seg, q_pos, q_seg, repeats=repeats)
            rows.append({"kind": "decode", "impl": name, "cache_tokens": length,
                         "seconds": seconds, "bytes_per_s": kv_bytes / seconds,
                         "fraction_of_copy_bandwidth": kv_bytes / seconds / bandwidth})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU in interpret mode (checks the script runs)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--cache-lengths", type=int, nargs="+",
                        default=[32768, 131072, 524288, 1048576])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.platform, args.lengths, args.cache_lengths, args.repeats = "cpu", [64], [256], 1
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.platform == "gpu" else "cpu")

    import jax
    import jax.numpy as jnp

    from cpjax.io import write_json

    interpret = args.platform != "gpu"
    hq, hkv, d = (4, 2, 64) if args.smoke else (32, 8, 128)
    bandwidth = _copy_bandwidth(2 ** 24 if args.smoke else 2 ** 31, args.repeats)
    rows = bench_prefill(args.lengths, hq, hkv, d, jnp.bfloat16, args.repeats, interpret,
                         args.platform)
    rows += bench_decode(args.cache_lengths, hq, hkv, d, jnp.bfloat16, args.repeats, interpret,
                         bandwidth)
    results = {"benchmark": "bench_kernels", "platform": args.platform,
               "device": str(jax.devices()[0]),
               "device_kind": getattr(jax.devices()[0], "device_kind", "unknown"),
               "jax": jax.__version__, "interpret": interpret, "dtype": "bfloat16",
               "heads": {"q": hq, "kv": hkv, "head_dim": d},
               "measured_copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}
    out = args.out or os.path.join(HERE, "results", f"bench_kernels_{args.platform}"
                                   f"{'_smoke' if args.smoke else ''}.json")
    write_json(out, results)
    for row in rows:
        print(row, file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
