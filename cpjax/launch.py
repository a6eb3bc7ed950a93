"""Start the processes of a multi-process run: ``python -m cpjax.launch [flags] -- COMMAND``.

On one machine (tests, laptops) it starts all ``--num-processes`` processes, each with
``--devices-per-process`` fake CPU devices::

    python -m cpjax.launch --num-processes 2 --devices-per-process 4 -- \\
        score --model tiny --context 8 --ids-file ids.npy --out lp.npy

On a cluster every host runs the same command with its own ``--process-id`` and the address of
process 0 (``--coordinator host:port``); the launcher then starts only that process.

``COMMAND`` is a ``python -m cpjax`` subcommand (``score ...``, ``generate ...``) or a Python
script (``path/to/script.py args``). Each process gets ``CPJAX_COORDINATOR``,
``CPJAX_NUM_PROCESSES`` and ``CPJAX_PROCESS_ID`` (read by ``cpjax.parallel.distributed``).
Process 0's output is passed through; the others' stderr lines carry a ``[process i]`` prefix
and gloo's connection chatter is dropped.

Failure handling: when a process exits with an error, the others get ``--grace`` seconds to
stop on their own (jax's runtime aborts them once the dead process misses its heartbeats), then
they are killed; the launcher prints one line naming the process that failed first and exits
with status 1. ``--timeout`` bounds the whole run (status 124). The processes never outlive the
launcher.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from cpjax.xla_env import fake_cpu_device_flags

POLL_S = 0.05


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_environment(
    base: dict,
    coordinator: str,
    num_processes: int,
    process_id: int,
    devices_per_process: int | None,
) -> dict:
    """The environment of process ``process_id``."""
    env = dict(base)
    env.update(
        CPJAX_COORDINATOR=coordinator,
        CPJAX_NUM_PROCESSES=str(num_processes),
        CPJAX_PROCESS_ID=str(process_id),
        PYTHONUNBUFFERED="1",
    )
    if devices_per_process is not None:
        env["XLA_FLAGS"] = fake_cpu_device_flags(env.get("XLA_FLAGS", ""), devices_per_process)
        env["JAX_PLATFORMS"] = "cpu"
    return env


def process_argv(command: list[str]) -> list[str]:
    """``python -m cpjax COMMAND`` or ``python SCRIPT.py ARGS``."""
    if command[0].endswith(".py"):
        return [sys.executable, *command]
    return [sys.executable, "-m", "cpjax", *command]


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be killed when the launcher dies (even by
    SIGKILL), so no process outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _copy_lines(stream, sink, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        if "connected peer ranks" in line:  # gloo's start-up chatter
            continue
        sink.write(prefix + line)
        sink.flush()
    stream.close()


def _describe(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


class ProcessSet:
    """Child processes with their output copied through.

    They stay in the launcher's process group, so whoever kills that group (a terminal's ^C,
    a test's clean-up) kills them too.
    """

    def __init__(self, argvs_envs: list[tuple[list[str], dict]], ids: list[int]):
        self.ids = ids
        self.procs = []
        self.threads = []
        for pid, (argv, env) in zip(ids, argvs_envs):
            proc = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=_die_with_parent,
            )
            self.procs.append(proc)
            out_prefix = "" if pid == 0 else f"[process {pid}] "
            for stream, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                thread = threading.Thread(
                    target=_copy_lines, args=(stream, sink, out_prefix), daemon=True
                )
                thread.start()
                self.threads.append(thread)

    def statuses(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def kill(self, sig=signal.SIGKILL) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def close(self) -> None:
        """Kill whatever still runs and wait for every process and output copy."""
        self.kill()
        for p in self.procs:
            p.wait()
        for t in self.threads:
            t.join(timeout=5)


def supervise(processes: ProcessSet, timeout_s: float | None, grace_s: float) -> int:
    """Wait for ``processes``; returns the launcher's exit status (0, 1 or 124)."""
    start = time.monotonic()
    failed_at = None
    first_failure = None
    while True:
        statuses = processes.statuses()
        if all(s is not None for s in statuses):
            break
        for pid, status in zip(processes.ids, statuses):
            if status not in (None, 0) and first_failure is None:
                first_failure, failed_at = (pid, status), time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            processes.kill()
            break
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            processes.kill()
            print(
                f"error: the run exceeded --timeout={timeout_s:g} s; killed its processes",
                file=sys.stderr,
            )
            return 124
        time.sleep(POLL_S)
    processes.close()
    if first_failure is None:
        failures = [(pid, s) for pid, s in zip(processes.ids, processes.statuses()) if s != 0]
        first_failure = failures[0] if failures else None
    if first_failure is None:
        return 0
    pid, status = first_failure
    others = len(processes.ids) - 1
    print(
        f"error: process {pid} {_describe(status)}"
        + (f"; stopped the other {others} process(es)" if others else ""),
        file=sys.stderr,
    )
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cpjax.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--num-processes", type=int, required=True, metavar="P")
    parser.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        metavar="K",
        help="fake CPU devices per process (omit on GPUs)",
    )
    parser.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="start only this process (one per host on a cluster)",
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0 (default: 127.0.0.1 and a free port; needed with --process-id)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="kill the run after S seconds (exit status 124)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="S",
        help="after a process fails, seconds the others get to stop on their "
        "own before they are killed (default 30)",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- then a cpjax subcommand or a script.py with its arguments",
    )
    return parser


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        _fail("no command: put it after `--`, e.g. -- score --model tiny --context 8 ...")
    if args.num_processes < 1:
        _fail(f"--num-processes={args.num_processes}: must be >= 1")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        _fail(f"--devices-per-process={args.devices_per_process}: must be >= 1")
    if args.process_id is not None:
        if not 0 <= args.process_id < args.num_processes:
            _fail(f"--process-id={args.process_id}: must be in [0, {args.num_processes})")
        if args.coordinator is None:
            _fail("--process-id needs --coordinator HOST:PORT (the address of process 0)")
    coordinator = args.coordinator or f"127.0.0.1:{free_port()}"
    ids = list(range(args.num_processes)) if args.process_id is None else [args.process_id]
    launches = [
        (
            process_argv(command),
            process_environment(
                os.environ, coordinator, args.num_processes, i, args.devices_per_process
            ),
        )
        for i in ids
    ]
    processes = ProcessSet(launches, ids)

    def stop(signum, _frame):
        processes.close()
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return supervise(processes, args.timeout, args.grace)
    finally:
        processes.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
