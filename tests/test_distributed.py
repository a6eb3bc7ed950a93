"""Multi-process context parallelism: 2 processes x 4 CPU devices (gloo) equal one 8-device
process; a dead process stops the run; start-up arguments are validated."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cpjax.errors import CpjaxError
from cpjax.parallel import distributed
from tests.conftest import REAL_MODELS

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess_worker.py")


def launch(*args, timeout=170, env=None):
    """``python -m cpjax.launch ARGS`` in its own process group, killed whole (launcher and
    workers) if it outlives ``timeout``; returns (returncode, stdout, stderr, seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpjax.launch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out, err, time.monotonic() - start


def reference(config, params, ids, new_tokens):
    """The same job in this process on 8 devices."""
    from cpjax.engine import ContextParallel, Engine
    from cpjax.parallel.mesh import make_mesh

    out = {}
    for strategy in ("pass_kv", "pass_q"):
        engine = Engine(config, params, ContextParallel(mesh=make_mesh(8), strategy=strategy))
        out[strategy] = engine.score(ids)
    out["tokens"] = np.asarray(engine.generate(ids[:40], new_tokens), np.int32)
    return out


def run_two_processes(tmp_path, model, ids, new_tokens):
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "out.npz"
    rc, stdout, stderr, _ = launch(
        "--num-processes",
        "2",
        "--devices-per-process",
        "4",
        "--timeout",
        "160",
        "--",
        WORKER,
        "--model",
        model,
        "--ids",
        str(tmp_path / "ids.npy"),
        "--out",
        str(out),
        "--new-tokens",
        str(new_tokens),
    )
    assert rc == 0, stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_tiny_model(tmp_path, tiny_params):
    from cpjax.config import PRESETS

    ids = np.random.default_rng(1).integers(0, 256, 301).astype(np.int32)
    got = run_two_processes(tmp_path, "tiny", ids, 8)
    want = reference(PRESETS["tiny"], tiny_params, ids, 8)
    for strategy in ("pass_kv", "pass_q"):
        assert np.abs(got[strategy] - want[strategy]).max() < 1e-5
    np.testing.assert_array_equal(got["tokens"], want["tokens"])


@pytest.mark.slow
@REAL_MODELS
def test_two_processes_equal_one_process_on_smollm2(tmp_path):
    from cpjax.loaders import load_model

    config, params, tokenizer = load_model("smollm2-135m")
    text = "Keys and values travel around a ring of hosts; queries stay where they are. " * 12
    ids = np.asarray(tokenizer.encode(text), np.int32)[:333]
    got = run_two_processes(tmp_path, "smollm2-135m", ids, 6)
    want = reference(config, params, ids, 6)
    for strategy in ("pass_kv", "pass_q"):
        assert np.abs(got[strategy] - want[strategy]).max() < 1e-4
    np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_cli_score_from_a_checkpoint_on_context_4_x_tensor_2_across_processes(
    tmp_path, tiny_params, single
):
    """The checkpoint is restored straight onto the global mesh (tensor inside a process,
    context across the two), through the launcher and the CLI."""
    from cpjax.config import PRESETS
    from cpjax.loaders.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", PRESETS["tiny"], tiny_params)
    ids = np.random.default_rng(2).integers(0, 256, 97).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    rc, stdout, stderr, _ = launch(
        "--num-processes",
        "2",
        "--devices-per-process",
        "4",
        "--timeout",
        "120",
        "--",
        "score",
        "--model",
        str(tmp_path / "ckpt"),
        "--context",
        "4",
        "--tensor",
        "2",
        "--strategy",
        "pass_q",
        "--ids-file",
        str(tmp_path / "ids.npy"),
        "--out",
        str(tmp_path / "lp.npy"),
    )
    assert rc == 0, stderr[-3000:]
    assert stdout.count('"mean_logprob"') == 1  # only process 0 prints
    assert np.abs(np.load(tmp_path / "lp.npy") - single.score(ids)).max() < 1e-5


def test_a_killed_process_stops_the_run_within_a_bounded_time(tmp_path):
    """Process 1 dies by SIGKILL mid-run; jax's runtime aborts process 0 once the heartbeats
    stop (5 s here), well before the launcher's 90 s grace would kill it."""
    np.save(tmp_path / "ids.npy", np.arange(64, dtype=np.int32))
    rc, _, stderr, seconds = launch(
        "--num-processes",
        "2",
        "--devices-per-process",
        "4",
        "--grace",
        "90",
        "--",
        WORKER,
        "--ids",
        str(tmp_path / "ids.npy"),
        "--die",
        env={distributed.ENV_HEARTBEAT: "5"},
        timeout=150,
    )
    assert rc == 1
    assert "error: process 1 was killed by SIGKILL" in stderr
    assert "another task died" in stderr  # process 0 stopped on its own
    assert seconds < 80


def test_launcher_timeout_kills_every_process(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(600)\n")
    rc, stdout, stderr, seconds = launch(
        "--num-processes", "2", "--timeout", "3", "--", str(script), timeout=60
    )
    assert rc == 124 and "exceeded --timeout=3 s" in stderr and seconds < 30
    pids = [
        int(line.split()[-1])
        for line in stdout.splitlines() + stderr.splitlines()
        if line.split() and line.split()[-1].isdigit()
    ]
    assert len(pids) == 2
    time.sleep(0.5)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-processes", "0", "--", "score"], "--num-processes=0: must be >= 1"),
        (["--num-processes", "2"], "no command"),
        (
            ["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1", "--", "score"],
            "--process-id=2: must be in [0, 2)",
        ),
        (["--num-processes", "2", "--process-id", "1", "--", "score"], "needs --coordinator"),
    ],
)
def test_launcher_rejects_bad_arguments(args, message):
    rc, _, stderr, _ = launch(*args, timeout=60)
    assert rc == 2 and message in stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CPJAX_COORDINATOR": "h:1"}, "CPJAX_NUM_PROCESSES, CPJAX_PROCESS_ID not set"),
        (
            {"CPJAX_COORDINATOR": "h:1", "CPJAX_NUM_PROCESSES": "two", "CPJAX_PROCESS_ID": "0"},
            "CPJAX_NUM_PROCESSES='two': not an integer",
        ),
        (
            {
                "CPJAX_COORDINATOR": "nohostport",
                "CPJAX_NUM_PROCESSES": "2",
                "CPJAX_PROCESS_ID": "0",
            },
            "expected host:port",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            "process_id=2: must be in [0, num_processes=2)",
        ),
    ],
)
def test_bad_multiprocess_environment_is_a_clear_error(env, message):
    with pytest.raises(CpjaxError, match=re.escape(message)):
        distributed.process_group_from_env(env)


def test_environment_describes_the_process_group():
    group = distributed.process_group_from_env(
        {
            "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
            "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "3",
            distributed.ENV_HEARTBEAT: "7",
        }
    )
    assert group == distributed.ProcessGroup("10.0.0.1:1234", 4, 3, heartbeat_timeout_s=7)
    assert distributed.process_group_from_env({}) is None


def test_global_mesh_keeps_tensor_inside_a_process_and_uses_every_device():
    mesh = distributed.global_mesh(4, 2)
    assert dict(mesh.shape) == {"context": 4, "tensor": 2}
    with pytest.raises(CpjaxError, match="must use all 8 devices"):
        distributed.global_mesh(2, 2)
    with pytest.raises(CpjaxError, match="tensor=3: must divide the 8 devices"):
        distributed.global_mesh(8, 3)


def test_put_and_fetch_round_trip_in_one_process():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = distributed.global_mesh(8)
    value = np.arange(32, dtype=np.float32).reshape(16, 2)
    array = distributed.put(value, NamedSharding(mesh, PartitionSpec("context")))
    assert len(array.addressable_shards) == 8
    np.testing.assert_array_equal(distributed.fetch(array), value)
