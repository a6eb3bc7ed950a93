"""Command line: ``python -m cpjax generate|score|chat|perfmodel|plan|convert|export|finetune``.

The flags are a stable contract (later features extend them, never break them). jax is imported
only after the arguments are parsed, because ``--fake-devices`` and ``--platform`` must be set in
the environment before jax starts. A user mistake prints one line ``error: ...`` and exits with
status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cpjax.names import (
    ATTENTION_IMPLEMENTATIONS,
    DECODE_STRATEGIES,
    DTYPES,
    HARDWARE_PRESETS,
    PREFILL_STRATEGIES,
)


def _common_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="preset name (smollm2-135m, tiny, ...), a .gguf file or a safetensors "
        "directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument(
        "--platform",
        default=None,
        choices=("cpu", "gpu"),
        help="jax platform (default: jax's choice)",
    )
    p.add_argument(
        "--fake-devices",
        type=int,
        default=None,
        metavar="K",
        help="simulate K CPU devices (sets the XLA host device count)",
    )
    p.add_argument(
        "--attention-impl",
        default="auto",
        choices=ATTENTION_IMPLEMENTATIONS,
        help="attention implementation; auto = pallas on GPU, blockwise else",
    )
    p.add_argument("--context", type=int, default=1, metavar="N", help="context-parallel mesh size")
    p.add_argument("--tensor", type=int, default=1, metavar="M", help="tensor-parallel mesh size")
    p.add_argument(
        "--strategy",
        default="auto",
        choices=PREFILL_STRATEGIES,
        help="context-parallel prefill ring; auto = the paper's heuristic per call",
    )
    p.add_argument(
        "--decode-strategy",
        default="allreduce",
        choices=DECODE_STRATEGIES,
        help="context-parallel decode: allreduce (replicated query, one merge "
        "collective; default, faster in experiments/decode.py) or ring_pass_q "
        "(the paper's)",
    )
    p.add_argument(
        "--check-finite",
        action="store_true",
        help="check every output for NaN/Inf and name the first layer where it "
        "appears (slower: keeps a host copy of the cache for a replay)",
    )
    p.add_argument(
        "--hardware",
        default=None,
        help=f"figures for --strategy auto: {' | '.join(HARDWARE_PRESETS)} (cpu: "
        f"measured here); default cpu, or h100-nvlink on GPU",
    )
    return p


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (repeatable); EOS always stops",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m cpjax``."""
    parser = argparse.ArgumentParser(
        prog="python -m cpjax", description="Context-parallel long-context LLM inference in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = _common_flags()

    gen = sub.add_parser("generate", parents=[common], help="generate text from a prompt")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file holding the prompt text")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message in the model's chat template",
    )
    _sampling_flags(gen)
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, token_ids, timings) instead of streaming",
    )

    score = sub.add_parser(
        "score", parents=[common], help="log-probabilities of each token given its prefix"
    )
    inputs = score.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--ids-file", help=".npy file of int token ids")
    inputs.add_argument("--text-file", help="text file, tokenized with the model's tokenizer")
    score.add_argument("--out", required=True, help="output .npy (float32, length T-1)")
    score.add_argument(
        "--split-at",
        default=None,
        metavar="K[,K2,...]",
        help="prefill [0, K) then partial-prefill the rest (each further split "
        "is another turn) against the persistent cache; same output",
    )

    perf = sub.add_parser(
        "perfmodel",
        help="predicted prefill or decode time under CP x TP (no weights loaded; cpjax.perfmodel)",
    )
    perf.add_argument("--model", default="llama3-405b", help="model preset name")
    perf.add_argument(
        "--phase",
        default="prefill",
        choices=("prefill", "decode"),
        help="prefill: TTFT of --tokens new tokens after --cached-tokens; decode: time per "
        "token (ttit_ms) with --cached-tokens of context",
    )
    perf.add_argument("--tokens", type=int, default=None, help="new tokens T (prefill)")
    perf.add_argument(
        "--cached-tokens", type=int, default=0, help="cached tokens P (the context in decode)"
    )
    perf.add_argument("--batch", type=int, default=1, help="sequences decoded together (decode)")
    perf.add_argument("--cp-nodes", type=int, default=1, help="context-parallel nodes N")
    perf.add_argument("--tp", type=int, default=8, help="tensor-parallel GPUs per CP rank")
    perf.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    perf.add_argument(
        "--hardware",
        default="h100-rdma",
        help=" | ".join(h for h in HARDWARE_PRESETS if h != "cpu"),
    )
    perf.add_argument("--strategy", default="auto", choices=PREFILL_STRATEGIES)
    perf.add_argument("--decode-strategy", default="ring_pass_q", choices=DECODE_STRATEGIES)

    planner = sub.add_parser(
        "plan",
        help="smallest CP x TP mesh whose predicted TTFT meets a target and that fits in memory",
    )
    planner.add_argument("--model", default="llama3-405b", help="model preset name")
    planner.add_argument("--tokens", type=int, required=True, help="new tokens T to prefill")
    planner.add_argument("--cached-tokens", type=int, default=0, help="cached tokens P")
    planner.add_argument("--target-ttft", type=float, default=60.0, help="TTFT target (s)")
    planner.add_argument(
        "--gpu-memory-gb", type=float, default=None, help="memory per GPU (default: hardware's)"
    )
    planner.add_argument(
        "--hardware",
        default="h100-rdma",
        help=" | ".join(h for h in HARDWARE_PRESETS if h != "cpu"),
    )
    planner.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    planner.add_argument("--max-nodes", type=int, default=32, help="nodes available")
    planner.add_argument("--json", action="store_true", help="print the whole plan as JSON")

    chat = sub.add_parser(
        "chat", parents=[common], help="interactive multi-turn chat with a persistent KV cache"
    )
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument(
        "--capacity",
        type=int,
        default=8192,
        metavar="TOKENS",
        help="KV cache capacity of the conversation",
    )
    _sampling_flags(chat)

    convert = sub.add_parser(
        "convert",
        help="convert a model once into a cpjax checkpoint "
        "(orbax; load it with --model DIR on any mesh)",
    )
    convert.add_argument(
        "--model",
        default="smollm2-135m",
        help="preset name, .gguf file or safetensors directory to convert",
    )
    convert.add_argument(
        "--out",
        required=True,
        help="checkpoint directory (an existing checkpoint there is replaced atomically)",
    )
    convert.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="dtype the parameters are stored in"
    )
    convert.add_argument(
        "--platform",
        default=None,
        choices=("cpu", "gpu"),
        help="jax platform (default: jax's choice)",
    )
    convert.set_defaults(fake_devices=None)  # read by _configure_jax_environment

    export = sub.add_parser(
        "export",
        help="write a model as an HF directory (model.safetensors, config.json, tokenizer "
        "files) that transformers loads",
    )
    export.add_argument(
        "--model",
        default="smollm2-135m",
        help="preset name, .gguf file, safetensors directory or cpjax checkpoint to export",
    )
    export.add_argument(
        "--out", required=True, help="new HF directory (must be absent or an empty folder)"
    )
    export.add_argument(
        "--platform",
        default=None,
        choices=("cpu", "gpu"),
        help="jax platform (default: jax's choice)",
    )
    export.set_defaults(fake_devices=None)  # read by _configure_jax_environment
    _finetune_parser(sub, common)
    return parser


def _finetune_parser(sub, common) -> None:
    from cpjax.names import OPTIMIZERS, REMAT, SCHEDULES

    tune = sub.add_parser(
        "finetune",
        parents=[common],
        help="fine-tune on a long token stream under context parallelism (exact gradients)",
    )
    data = tune.add_mutually_exclusive_group(required=True)
    data.add_argument("--ids-file", help=".npy file of a 1-D int token stream")
    data.add_argument("--text-file", help="UTF-8 text, tokenized with the model's tokenizer")
    tune.add_argument("--seq-len", type=int, required=True, metavar="N", help="tokens a sequence")
    tune.add_argument("--batch-size", type=int, default=1, metavar="B", help="sequences a batch")
    tune.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches a step")
    tune.add_argument("--steps", type=int, required=True, metavar="S", help="optimizer steps")
    tune.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    tune.add_argument("--learning-rate", type=float, required=True, metavar="LR")
    tune.add_argument("--weight-decay", type=float, default=0.0, help="adamw only")
    tune.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up from 0")
    tune.add_argument("--schedule", default="constant", choices=SCHEDULES, help="after the warm-up")
    tune.add_argument("--max-grad-norm", type=float, default=None, help="clip the global norm")
    tune.add_argument(
        "--remat", default="full", choices=REMAT, help="what a layer keeps for the backward"
    )
    tune.add_argument("--out", required=True, help="run directory (state/ and model/)")
    tune.add_argument("--save-every", type=int, default=0, metavar="K", help="0: at the end")
    tune.add_argument("--resume", action="store_true", help="continue the run in --out")
    tune.add_argument("--json", action="store_true", help="one JSON line per step on stdout")


def _configure_jax_environment(args) -> None:
    """Set the environment that must exist before jax is imported."""
    if args.fake_devices is not None:
        if args.fake_devices < 1:
            _fail(f"--fake-devices={args.fake_devices}: must be >= 1")
        from cpjax.xla_env import fake_cpu_device_flags  # imports no jax

        os.environ["XLA_FLAGS"] = fake_cpu_device_flags(
            os.environ.get("XLA_FLAGS", ""), args.fake_devices
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.platform is not None:
        os.environ["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[args.platform]


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _status(message: str) -> None:
    """A status line on stderr (from process 0 only, in a multi-process run)."""
    from cpjax.parallel.distributed import is_main_process

    if is_main_process():
        print(message, file=sys.stderr)


def _start_distributed() -> None:
    """Join a multi-process run when the environment describes one (``python -m
    cpjax.launch`` sets it); only process 0 prints and writes files."""
    from cpjax.parallel import distributed

    group = distributed.process_group_from_env()
    if group is None or group.num_processes == 1:
        return
    distributed.initialize(group)
    if group.process_id != 0:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")


def _mesh(args):
    """The ``(context, tensor)`` mesh the flags ask for, or None for one device."""
    import jax

    from cpjax.errors import require
    from cpjax.hardware import get_hardware
    from cpjax.parallel.distributed import global_mesh
    from cpjax.parallel.mesh import make_mesh

    require(args.context >= 1, f"--context={args.context}: must be >= 1")
    require(args.tensor >= 1, f"--tensor={args.tensor}: must be >= 1")
    multi_process = jax.process_count() > 1
    if args.context == 1 and args.tensor == 1 and not multi_process:
        return None
    if args.hardware is not None:
        get_hardware(args.hardware)  # an unknown name fails here, before any work
    return (global_mesh if multi_process else make_mesh)(args.context, args.tensor)


def _make_engine(args, config, params, mesh):
    """An ``Engine`` on one device, or context-parallel on ``mesh``."""
    from cpjax.engine import ContextParallel, Engine, SingleDevice

    placement = (
        SingleDevice()
        if mesh is None
        else ContextParallel(
            mesh,
            strategy=args.strategy,
            decode_strategy=args.decode_strategy,
            hardware=args.hardware,
        )
    )
    return Engine(
        config,
        params,
        placement,
        dtype=args.dtype,
        attention=args.attention_impl,
        check_finite=args.check_finite,
    )


def _sampling(args):
    from cpjax.engine.sampling import Sampling
    from cpjax.errors import require

    require(args.max_new_tokens >= 0, f"--max-new-tokens={args.max_new_tokens}: must be >= 0")
    try:
        return Sampling(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
        )
    except Exception as exc:
        raise type(exc)(f"--{str(exc).replace('_', '-', 1)}") from None


def _decode_rate(stamps: list) -> float | None:
    """Tokens/s after the first decode step (which compiles)."""
    return (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else None


def _read_text(path: str, what: str) -> str:
    from cpjax.errors import require

    require(os.path.isfile(path), f"{what} {path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _run_generate(args, engine, tokenizer) -> None:
    from cpjax.errors import require

    prompt = (
        args.prompt if args.prompt is not None else _read_text(args.prompt_file, "--prompt-file")
    )
    require(prompt.strip() != "", "the prompt is empty")
    if args.chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    ids = tokenizer.encode(prompt)
    sampling = _sampling(args)
    from cpjax.engine.textgen import stream_text

    start = time.perf_counter()
    new_ids: list[int] = []
    stamps: list[float] = []

    def tokens():
        for token in engine.generate_stream(ids, args.max_new_tokens, tokenizer.eos_ids, sampling):
            stamps.append(time.perf_counter() - start)
            yield token

    pieces = []
    for piece in stream_text(tokens(), tokenizer, args.stop, consumed=new_ids):
        pieces.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    total = time.perf_counter() - start
    text = "".join(pieces)
    ttft = stamps[0] if stamps else None
    rate = _decode_rate(stamps)
    if args.json:
        print(
            json.dumps(
                {
                    "text": text,
                    "token_ids": new_ids,
                    "prompt_tokens": len(ids),
                    "ttft_s": ttft,
                    "decode_tok_s": rate,
                    "total_s": total,
                }
            )
        )
    else:
        sys.stdout.write("\n")
        rate_text = f"{rate:.1f} tok/s" if rate is not None else "n/a"
        _status(
            f"[{len(ids)} prompt tokens, {len(new_ids)} new; time to first token "
            f"{(ttft or 0):.2f} s incl. compilation, decode {rate_text}]"
        )


def _run_chat(args, engine, tokenizer) -> None:
    """Read user turns from stdin; each turn is a partial prefill against the kept cache."""
    import jax

    from cpjax.engine.session import Session
    from cpjax.engine.textgen import stream_text
    from cpjax.errors import require

    sampling = _sampling(args)
    require(
        jax.process_count() == 1,
        "chat reads its turns from stdin and runs in one "
        "process; use generate or score for multi-process runs",
    )
    require(
        tokenizer.chat_template is not None,
        f"model {args.model!r} has no chat template; use `generate` instead",
    )
    session = Session(engine, args.capacity)
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    seen_text = ""  # the text whose tokens are in the cache (or pending)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # Feed only what the cache has not seen; if the template re-renders earlier turns
        # differently, feed the new messages' own rendering.
        new_text = (
            full[len(seen_text) :]
            if full.startswith(seen_text)
            else tokenizer.apply_chat_template(messages[-1:], add_generation_prompt=True)
        )
        generated: list[int] = []
        stream = session.turn(
            tokenizer.encode(new_text), args.max_new_tokens, tokenizer.eos_ids, sampling
        )
        reply = "".join(
            piece for piece in _echo(stream_text(stream, tokenizer, args.stop, consumed=generated))
        )
        messages.append({"role": "assistant", "content": reply})
        seen_text = full + tokenizer.decode(generated, skip_special=False)
        rate = session.last_decode_tok_s
        print(
            f"[turn {session.turns}: {len(generated)} tokens, time to first token "
            f"{session.last_ttft_s:.2f} s, decode "
            f"{f'{rate:.1f} tok/s' if rate else 'n/a'}, {session.position} tokens cached]",
            file=sys.stderr,
        )


def _echo(pieces):
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        yield piece
    sys.stdout.write("\n")
    sys.stdout.flush()


def _run_score(args, engine, tokenizer) -> None:
    import numpy as np

    from cpjax.errors import require
    from cpjax.io import save_npy

    if args.ids_file is not None:
        require(os.path.isfile(args.ids_file), f"--ids-file {args.ids_file!r}: no such file")
        try:
            ids = np.load(args.ids_file, allow_pickle=False)
        except (ValueError, OSError) as exc:
            _fail(f"--ids-file {args.ids_file!r}: not a readable .npy file ({exc})")
    else:
        ids = np.asarray(tokenizer.encode(_read_text(args.text_file, "--text-file")), np.int32)
    split_at = None
    if args.split_at is not None:
        try:
            split_at = [int(k) for k in args.split_at.split(",")]
        except ValueError:
            _fail(f"--split-at {args.split_at!r}: expected integers like 1000 or 1000,2000")
    logprobs = engine.score(ids, split_at=split_at)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    require(os.path.isdir(out_dir), f"--out {args.out!r}: directory {out_dir!r} does not exist")
    from cpjax.parallel.distributed import is_main_process

    if is_main_process():
        save_npy(args.out, logprobs)
    print(
        json.dumps(
            {"tokens": int(ids.size), "out": args.out, "mean_logprob": float(logprobs.mean())}
        )
    )


def _run_convert(args) -> None:
    """Load ``--model``, cast it to ``--dtype`` and save it as a checkpoint at ``--out``."""
    import jax
    import numpy as np

    from cpjax.loaders import load_model
    from cpjax.loaders.checkpoint import save_checkpoint

    start = time.perf_counter()
    config, params, tokenizer = load_model(args.model)
    params = jax.tree.map(lambda x: np.asarray(x).astype(args.dtype, copy=False), params)
    save_checkpoint(args.out, config, params, tokenizer)
    leaves = jax.tree.leaves(params)
    print(
        json.dumps(
            {
                "path": os.path.abspath(args.out),
                "model": config.name,
                "dtype": args.dtype,
                "params": int(sum(x.size for x in leaves)),
                "bytes": int(sum(x.nbytes for x in leaves)),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    )


def _run_export(args) -> None:
    """Load ``--model`` and write it as an HF directory at ``--out`` (float32 weights)."""
    from cpjax.loaders import load_model
    from cpjax.loaders.export import check_export_target, export_hf
    from cpjax.parallel.distributed import is_main_process

    start = time.perf_counter()
    check_export_target(args.out)  # before the (slow) load
    config, params, tokenizer = load_model(args.model)
    if not is_main_process():
        return
    files = export_hf(args.out, config, params, tokenizer)
    print(
        json.dumps(
            {
                "path": os.path.abspath(args.out),
                "model": config.name,
                "files": files,
                "tokenizer": tokenizer is not None,
                "bytes": sum(os.path.getsize(os.path.join(args.out, f)) for f in files),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    )


def _run_finetune(args) -> None:
    """Fine-tune ``--model`` on the token stream; save the run to ``--out``."""
    import numpy as np

    from cpjax.engine import ContextParallel, SingleDevice
    from cpjax.loaders import load_model
    from cpjax.parallel.distributed import is_main_process
    from cpjax.train import OptimizerConfig, Trainer
    from cpjax.train.data import TokenStream, read_ids_file
    from cpjax.train.run import check_run, finetune, model_path

    optimizer = OptimizerConfig(
        args.optimizer,
        args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        total_steps=args.steps if args.steps >= 1 else None,
        max_grad_norm=args.max_grad_norm,
    )
    ids = read_ids_file(args.ids_file) if args.ids_file is not None else None
    mesh = _mesh(args)
    config, params, tokenizer = load_model(args.model, mesh=mesh)
    if ids is None:
        ids = np.asarray(tokenizer.encode(_read_text(args.text_file, "--text-file")), np.int32)
    placement = (
        SingleDevice(prefill_chunk=None)
        if mesh is None
        else ContextParallel(mesh, strategy=args.strategy, hardware=args.hardware)
    )
    trainer = Trainer(
        config,
        placement,
        optimizer,
        dtype=args.dtype,
        remat=args.remat,
        attention=args.attention_impl,
        check_finite=args.check_finite,
    )
    check_run(trainer, args.seq_len, args.steps, args.batch_size, args.grad_accum, args.save_every)
    stream = TokenStream(ids, args.seq_len)
    start = time.perf_counter()

    def report(metrics) -> None:
        if args.json and is_main_process():
            print(json.dumps(metrics._asdict()), flush=True)

    state, history = finetune(
        trainer,
        params,
        stream,
        steps=args.steps,
        out=args.out,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        save_every=args.save_every,
        resume=args.resume,
        tokenizer=tokenizer,
        on_step=report,
        progress=not args.json,
    )
    seconds = time.perf_counter() - start
    tokens = sum(m.n_tokens for m in history)
    _status(
        json.dumps(
            {
                "model": model_path(args.out),
                "steps": state.step,
                "final_loss": history[-1].loss if history else None,
                "train_tokens_per_s": round(tokens / seconds, 1) if history else None,
            }
        )
    )


def _preset_model_and_hardware(args):
    from cpjax.config import PRESETS
    from cpjax.errors import require
    from cpjax.hardware import PRESETS as HARDWARE

    require(
        args.model in PRESETS,
        f"--model {args.model!r}: the performance model takes a preset name ({', '.join(PRESETS)})",
    )
    require(
        args.hardware in HARDWARE,
        f"--hardware {args.hardware!r}: choose one of {', '.join(HARDWARE)}",
    )
    return PRESETS[args.model], HARDWARE[args.hardware]


def _run_perfmodel(args) -> None:
    from cpjax.errors import require
    from cpjax.perfmodel import Deployment, decode_time, prefill_time

    config, hardware = _preset_model_and_hardware(args)
    deployment = Deployment(cp=args.cp_nodes, tp=args.tp, gpus_per_node=args.gpus_per_node)
    common = {
        "model": config.name,
        "hardware": args.hardware,
        "phase": args.phase,
        "cp_nodes": args.cp_nodes,
        "tp": args.tp,
        "cached_tokens": args.cached_tokens,
    }
    if args.phase == "decode":
        require(
            args.cached_tokens >= 1,
            f"--cached-tokens {args.cached_tokens}: decode needs a context of >= 1 token",
        )
        decode = decode_time(
            config, args.cached_tokens, deployment, hardware, args.batch, args.decode_strategy
        )
        print(json.dumps({**common, "batch": args.batch, **decode}, indent=1))
        return
    require(
        args.tokens is not None and args.tokens >= 1,
        f"--tokens {args.tokens}: a prefill needs --tokens >= 1",
    )
    prefill = prefill_time(
        config, args.tokens, deployment, hardware, args.cached_tokens, args.strategy
    )
    print(json.dumps({**common, "new_tokens": args.tokens, **prefill}, indent=1))


def _plan_table(result: dict) -> str:
    """The plan as text: one line per mesh, then the answer."""
    lines = [
        f"{result['model']}, {result['tokens']} new tokens after {result['cached_tokens']} "
        f"cached, {result['hardware']}, {result['gpu_memory_gb']:g} GB per GPU, "
        f"target TTFT {result['target_ttft_s']:g} s",
        f"{'mesh':>12} {'nodes':>5} {'GPUs':>5} {'TTFT s':>8} {'prefill':>10} "
        f"{'TTIT ms':>8} {'decode':>11} {'GB/GPU':>7} {'bound':>13}  meets",
    ]
    for r in result["meshes"]:
        lines.append(
            f"{'CP' + str(r['cp']) + 'xTP' + str(r['tp']):>12} {r['nodes']:>5} {r['gpus']:>5} "
            f"{r['ttft_s']:>8.2f} {r['prefill_strategy']:>10} {r['ttit_ms']:>8.1f} "
            f"{r['decode_strategy']:>11} {r['memory_gb']:>7.1f} {r['bound']:>13}  "
            f"{'yes' if r['meets_target'] else 'no'}"
        )
    chosen = result["chosen"]
    if chosen is None:
        lines.append("no mesh fits and meets the target")
    else:
        lines.append(
            f"smallest mesh meeting the target: CP{chosen['cp']} x TP{chosen['tp']} "
            f"({chosen['nodes']} nodes, {chosen['gpus']} GPUs): TTFT {chosen['ttft_s']:.1f} s "
            f"({chosen['prefill_strategy']}), bound by {chosen['bound']} "
            f"(compute {chosen['compute_s']:.1f} s, communication "
            f"{chosen['communication_s']:.1f} s), {chosen['memory_gb']:.1f} GB per GPU"
        )
    return "\n".join(lines)


def _run_plan(args) -> None:
    from cpjax.perfmodel import plan

    config, hardware = _preset_model_and_hardware(args)
    result = plan(
        config,
        args.tokens,
        hardware,
        cached_tokens=args.cached_tokens,
        target_ttft_s=args.target_ttft,
        gpu_memory_gb=args.gpu_memory_gb,
        gpus_per_node=args.gpus_per_node,
        max_nodes=args.max_nodes,
    )
    print(json.dumps(result, indent=1) if args.json else _plan_table(result))


def main(argv=None) -> None:
    """Entry point of ``python -m cpjax``."""
    args = build_parser().parse_args(argv)
    from cpjax.errors import CpjaxError

    if args.command in ("perfmodel", "plan"):
        try:
            return {"perfmodel": _run_perfmodel, "plan": _run_plan}[args.command](args)
        except CpjaxError as exc:
            _fail(str(exc))
    _configure_jax_environment(args)
    try:
        _start_distributed()
        if args.command == "convert":
            return _run_convert(args)
        if args.command == "export":
            return _run_export(args)
        if args.command == "finetune":
            return _run_finetune(args)
        from cpjax.loaders import load_model

        mesh = _mesh(args)
        config, params, tokenizer = load_model(args.model, mesh=mesh)
        engine = _make_engine(args, config, params, mesh)
        {"generate": _run_generate, "score": _run_score, "chat": _run_chat}[args.command](
            args, engine, tokenizer
        )
    except CpjaxError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
