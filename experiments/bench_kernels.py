"""Attention kernel benchmark: Pallas flash/decode vs cuDNN vs XLA, side by side in one run.

Prefill: causal forward, ``Hq`` query heads / ``Hkv`` KV heads, head_dim ``D``, bf16, reported
in TFLOP/s (causal FLOPs = 2 * T^2 * Hq * D, i.e. the 4 * T^2 * Hq * D of full attention, QK^T and
PV, halved by the causal mask) and as a ratio to cuDNN at the same T (``vs_cudnn``). Impls:
``pallas`` (Triton), ``pallas_mgpu`` / ``pallas_mgpu_bk128`` (Hopper, Pallas Mosaic GPU, block_k
64 / 128, 2 slots), ``cudnn``, ``xla_dense`` (T <= 16K), ``blockwise_xla``. Decode: one query token
per head against a cache of ``L`` tokens, reported as K/V bytes read per second and as a fraction
of the device's measured copy bandwidth.

A GPU run never loses a finished measurement: every row is printed as it is measured and the JSON
is rewritten (atomically) after every row; ``"complete": true`` marks a run that reached the end.
Each implementation's timing is wrapped (an error is recorded in its row), and an implementation
whose call took longer than ``--max-seconds-per-call`` (or that failed) is skipped at the larger
sizes (a row with ``"skipped"``). Default order: prefill 4K, 16K (the headline numbers), 64K,
128K, then decode 32K .. 1M.

GPU: ``python -m experiments.bench_kernels --platform gpu``
CPU smoke run (interpret mode, tiny shapes): ``python -m experiments.bench_kernels --smoke``
Writes ``experiments/results/bench_kernels_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))

FLOPS_FORMULA = (
    "causal prefill FLOPs = 2 * T^2 * Hq * D (full attention's 4 * T^2 * Hq * D for "
    "QK^T and PV, halved by the causal mask)"
)
VS_CUDNN = "tflops / cudnn tflops at the same tokens (= cudnn seconds / seconds; > 1 is faster)"


def _measure(fn, args, repeats: int, max_seconds=None):
    """Run ``fn(*args)`` once (compiles; its output is returned), then time up to ``repeats``
    calls, stopping early once the whole measurement has taken more than ``max_seconds`` (at least
    one timed call)."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    while len(times) < max(1, repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        if max_seconds is not None and first + sum(times) > max_seconds:
            break
    return out, {
        "seconds": statistics.median(times),
        "max_call_seconds": max(times),
        "first_call_seconds": first,
        "repeats": len(times),
    }


def _copy_bandwidth(n_bytes: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    return 2 * x.nbytes / _measure(copy, (x,), repeats)[1]["seconds"]


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


class Recorder:
    """Holds the results; prints each row as it comes and rewrites the JSON after each."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.results = dict(meta, complete=False, elapsed_s=0.0, rows=[])
        self.start = time.perf_counter()

    @property
    def rows(self):
        return self.results["rows"]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self, complete: bool = False) -> None:
        from experiments.provenance import write_results

        add_cudnn_ratios(self.rows)
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.results["complete"] = complete
        write_results(self.path, self.results)


def add_cudnn_ratios(rows) -> None:
    """``vs_cudnn`` on each measured prefill row that has a measured cudnn row at the same T."""
    cudnn = {
        r["tokens"]: r["tflops"]
        for r in rows
        if r["kind"] == "prefill" and r["impl"] == "cudnn" and "tflops" in r
    }
    for r in rows:
        if r["kind"] == "prefill" and "tflops" in r and r["tokens"] in cudnn:
            r["vs_cudnn"] = round(r["tflops"] / cudnn[r["tokens"]], 4)


def _run_sizes(recorder, kind, size_key, sizes, make_case, metrics, repeats, max_seconds):
    """For each size (in order), time every implementation ``make_case(size)`` returns; an
    implementation that failed, or whose call took longer than ``max_seconds``, is skipped at the
    larger sizes. Each measured row gets the largest |difference| of its output from the first
    implementation measured at that size (``max_abs_diff``, ``diff_vs``)."""
    import jax.numpy as jnp

    skip = {}
    for size in sizes:
        try:
            args, impls = make_case(size)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the inputs
            traceback.print_exc()
            recorder.add({"kind": kind, "impl": "inputs", size_key: size, "error": _error(exc)})
            continue
        reference = None
        for name, fn in impls.items():
            row = {"kind": kind, "impl": name, size_key: size}
            if name in skip:
                recorder.add(dict(row, skipped=skip[name]))
                continue
            out = None
            try:
                out, timing = _measure(fn, args, repeats, max_seconds)
                row.update(timing)
                row.update(metrics(size, args, timing["seconds"]))
            except Exception as exc:  # noqa: BLE001 - record why an implementation could not run
                traceback.print_exc()
                row["error"] = _error(exc)
                skip[name] = f"failed at {size_key}={size}: {row['error'][:120]}"
            if out is not None:
                try:
                    if reference is None:
                        reference = (name, out)
                    else:
                        row["max_abs_diff"] = float(
                            jnp.max(
                                jnp.abs(out.astype(jnp.float32) - reference[1].astype(jnp.float32))
                            )
                        )
                        row["diff_vs"] = reference[0]
                except Exception as exc:  # noqa: BLE001 - the timing stands without the check
                    row["diff_error"] = _error(exc)
            del out
            recorder.add(row)
            took = row.get("max_call_seconds", 0.0)
            if max_seconds is not None and took > max_seconds:
                skip[name] = (
                    f"previous size took {took:.1f} s ({size_key}={size}; "
                    f"--max-seconds-per-call {max_seconds:g})"
                )
        del args, reference


def kernel_params(interpret: bool) -> dict:
    """The block settings each Pallas implementation is called with (recorded in the JSON)."""
    return {
        "pallas": (
            {"block_q": 16, "block_k": 16} if interpret else {"block_q": 128, "block_k": 64}
        ),
        "pallas_mgpu": {"block_k": 64, "slots": 2},
        "pallas_mgpu_bk128": {"block_k": 128, "slots": 2},
        "pallas_decode": {"block_k": 16 if interpret else 128},
    }


def bench_prefill(
    recorder, lengths, hq, hkv, d, dtype, repeats, interpret, platform, max_seconds=None
):
    import jax
    import jax.numpy as jnp

    from cpjax.attention import blockwise
    from pallas_kernels import flash_attention, flash_attention_mgpu

    params = kernel_params(interpret)

    def make_case(t):
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(t), 3)
        q = jax.random.normal(kq, (t, hq, d), dtype)
        k = jax.random.normal(kk, (t, hkv, d), dtype)
        v = jax.random.normal(kv, (t, hkv, d), dtype)
        pos = jnp.arange(t, dtype=jnp.int32)
        seg = jnp.zeros((t,), jnp.int32)
        impls = {}
        if platform == "gpu":
            impls["cudnn"] = jax.jit(
                lambda q, k, v, *_: jax.nn.dot_product_attention(
                    q[None], k[None], v[None], is_causal=True, implementation="cudnn"
                )[0]
            )
        impls["pallas"] = jax.jit(
            lambda *a: flash_attention(*a, **params["pallas"], interpret=interpret)[0]
        )
        impls["pallas_mgpu"] = jax.jit(
            lambda *a: flash_attention_mgpu(*a, **params["pallas_mgpu"], interpret=interpret)[0]
        )
        impls["pallas_mgpu_bk128"] = jax.jit(
            lambda *a: flash_attention_mgpu(*a, **params["pallas_mgpu_bk128"], interpret=interpret)[
                0
            ]
        )
        if platform == "gpu" and t <= 16384:  # dense XLA materialises Hq x T x T scores
            impls["xla_dense"] = jax.jit(
                lambda q, k, v, *_: jax.nn.dot_product_attention(
                    q[None], k[None], v[None], is_causal=True, implementation="xla"
                )[0]
            )
        impls["blockwise_xla"] = jax.jit(lambda *a: blockwise.attend(*a)[0])
        return jax.block_until_ready((q, k, v, pos, pos, seg, seg)), impls

    def metrics(t, _args, seconds):
        return {"tflops": 2.0 * t * t * hq * d / seconds / 1e12}

    _run_sizes(recorder, "prefill", "tokens", lengths, make_case, metrics, repeats, max_seconds)


def bench_decode(
    recorder, cache_lengths, hq, hkv, d, dtype, repeats, interpret, bandwidth, max_seconds=None
):
    import jax
    import jax.numpy as jnp

    from cpjax.attention import blockwise
    from pallas_kernels import decode_attention

    def make_case(length):
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(length), 3)
        q = jax.random.normal(kq, (1, hq, d), dtype)
        k = jax.random.normal(kk, (length, hkv, d), dtype)
        v = jax.random.normal(kv, (length, hkv, d), dtype)
        kv_pos = jnp.arange(length, dtype=jnp.int32)
        kv_seg = jnp.zeros((length,), jnp.int32)
        q_pos = jnp.array([length], jnp.int32)
        q_seg = jnp.zeros((1,), jnp.int32)
        impls = {
            "pallas_decode": jax.jit(
                lambda *a: decode_attention(
                    *a, **kernel_params(interpret)["pallas_decode"], interpret=interpret
                )[0]
            ),
            "blockwise_xla": jax.jit(lambda *a: blockwise.attend(*a)[0]),
        }
        args = (q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        return jax.block_until_ready(args), impls

    def metrics(_length, args, seconds):
        kv_bytes = args[1].nbytes + args[2].nbytes
        row = {"bytes_per_s": kv_bytes / seconds}
        if bandwidth:
            row["fraction_of_copy_bandwidth"] = kv_bytes / seconds / bandwidth
        return row

    _run_sizes(
        recorder, "decode", "cache_tokens", cache_lengths, make_case, metrics, repeats, max_seconds
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="gpu")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU in interpret mode (checks the script runs)",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="prefill lengths, in the order run (default 4096 16384 65536 131072; smoke: 64)",
    )
    parser.add_argument(
        "--cache-lengths",
        type=int,
        nargs="+",
        default=None,
        help="decode cache lengths, in the order run (default 32768 131072 "
        "524288 1048576; smoke: 256)",
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only-prefill", action="store_true")
    only.add_argument("--only-decode", action="store_true")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per measurement (default 5; smoke: 1)",
    )
    parser.add_argument(
        "--max-seconds-per-call",
        type=float,
        default=20.0,
        help="skip an implementation's larger sizes once one of its calls took "
        "longer; also ends a measurement's repeats early",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.platform = "cpu"
    if args.lengths is None:
        args.lengths = [64] if args.smoke else [4096, 16384, 65536, 131072]
    if args.cache_lengths is None:
        args.cache_lengths = [256] if args.smoke else [32768, 131072, 524288, 1048576]
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.platform == "gpu" else "cpu")

    import jax
    import jax.numpy as jnp

    interpret = args.platform != "gpu"
    hq, hkv, d = (4, 2, 64) if args.smoke else (32, 8, 128)
    out = args.out or os.path.join(
        HERE, "results", f"bench_kernels_{args.platform}{'_smoke' if args.smoke else ''}.json"
    )
    from pallas_kernels.flash_attention_mgpu import BLOCK_Q as MGPU_BLOCK_Q

    meta = {
        "benchmark": "bench_kernels",
        "platform": args.platform,
        "device": str(jax.devices()[0]),
        "device_kind": getattr(jax.devices()[0], "device_kind", "unknown"),
        "jax": jax.__version__,
        "interpret": interpret,
        "dtype": "bfloat16",
        "heads": {"q": hq, "kv": hkv, "head_dim": d},
        "flops_formula": FLOPS_FORMULA,
        "vs_cudnn": VS_CUDNN,
        "impl_params": {
            name: dict(p, block_q=MGPU_BLOCK_Q) if "mgpu" in name else p
            for name, p in kernel_params(interpret).items()
        },
        "lengths": [] if args.only_decode else args.lengths,
        "cache_lengths": [] if args.only_prefill else args.cache_lengths,
        "repeats": args.repeats,
        "max_seconds_per_call": args.max_seconds_per_call,
    }
    try:
        bandwidth = _copy_bandwidth(2**24 if args.smoke else 2**31, args.repeats)
    except Exception as exc:  # noqa: BLE001 - the kernels can still be timed
        traceback.print_exc()
        bandwidth, meta["copy_bandwidth_error"] = None, _error(exc)
    meta["measured_copy_bandwidth_bytes_per_s"] = bandwidth
    recorder = Recorder(out, meta)
    recorder.write()
    print(
        f"bench_kernels: {meta['device_kind']} ({meta['device']}), jax {jax.__version__}, "
        f"copy bandwidth {bandwidth or float('nan'):.3g} B/s -> {out}",
        flush=True,
    )
    if not args.only_decode:
        bench_prefill(
            recorder,
            args.lengths,
            hq,
            hkv,
            d,
            jnp.bfloat16,
            args.repeats,
            interpret,
            args.platform,
            args.max_seconds_per_call,
        )
    if not args.only_prefill:
        bench_decode(
            recorder,
            args.cache_lengths,
            hq,
            hkv,
            d,
            jnp.bfloat16,
            args.repeats,
            interpret,
            bandwidth,
            args.max_seconds_per_call,
        )
    recorder.write(complete=True)
    print(f"bench_kernels: done in {recorder.results['elapsed_s']} s -> {out}", flush=True)
    return recorder.results


if __name__ == "__main__":
    main()
