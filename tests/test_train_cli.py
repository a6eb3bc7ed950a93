"""``python -m cpjax finetune``: a killed run resumes to the same parameters; one-line errors."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.engine import ContextParallel
from cpjax.loaders.checkpoint import load_checkpoint
from cpjax.model.decoder import init_params
from cpjax.parallel.mesh import make_mesh
from cpjax.train import OptimizerConfig, Trainer
from cpjax.train.data import TokenStream
from cpjax.train.run import finetune
from tests.test_cli import ROOT, run_cli

SEQ_LEN, BATCH, STEPS, LR = 45, 2, 4, 0.05
MESH = ["--fake-devices", "8", "--context", "2", "--strategy", "pass_kv"]


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ids.npy"
    ids = np.random.default_rng(0).integers(0, PRESETS["tiny"].vocab_size, 1000)
    np.save(path, ids.astype(np.int32))
    return str(path)


def _args(ids_file, out, steps=STEPS, *extra):
    return [
        "finetune", "--model", "tiny", "--ids-file", ids_file, "--seq-len", str(SEQ_LEN),
        "--batch-size", str(BATCH), "--steps", str(steps), "--learning-rate", str(LR),
        "--out", str(out), *MESH, *extra,
    ]  # fmt: skip


def _killed_after_step(args, step: int):
    """Run the CLI and SIGKILL it as soon as it reports ``step`` (a JSON line per step)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpjax", *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
    )
    for line in proc.stdout:
        if json.loads(line)["step"] == step:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return proc.returncode


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_parameters_of_an_uninterrupted_one(ids_file, tmp_path):
    """Saves every 2 steps; killed once step 3 is done (step 2 saved, step 3 lost). A new run
    into the same --out and a resume with another optimizer are refused, naming the reason;
    the resume to step 4 ends with the parameters, bit for bit, of 4 uninterrupted steps
    (same batches from the saved data position, same optimizer state)."""
    config = PRESETS["tiny"]
    trainer = Trainer(
        config,
        ContextParallel(make_mesh(2), strategy="pass_kv"),
        OptimizerConfig("sgd", LR, total_steps=STEPS),
    )
    ids = np.load(ids_file)
    state, _ = finetune(
        trainer, init_params(config), TokenStream(ids, SEQ_LEN), steps=STEPS,
        batch_size=BATCH, progress=False,
    )  # fmt: skip

    out = tmp_path / "run"
    killed = _killed_after_step(_args(ids_file, out, STEPS, "--save-every", "2"), step=3)
    assert killed == -signal.SIGKILL
    assert sorted(os.listdir(out / "state")) == ["2"]
    again = run_cli(*_args(ids_file, out, STEPS))
    assert again.returncode == 2 and "already holds a run (saved at step 2)" in again.stderr
    other = run_cli(*_args(ids_file, out, STEPS, "--resume", "--optimizer", "adamw"))
    assert other.returncode == 2
    assert "saved with other settings: optimizer.name: saved 'sgd', now 'adamw'" in other.stderr
    resumed = run_cli(*_args(ids_file, out, STEPS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    _, params, _ = load_checkpoint(str(out / "model"))
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "change, message",
    [
        (["--learning-rate", "0"], "learning_rate=0.0: must be a finite number > 0"),
        (["--seq-len", "20000"], "seq_len=20000 exceeds the model's window of 16384"),
        (["--seq-len", "5000"], "shorter than one sequence of seq_len=5000"),
        (["--optimizer", "lion"], "invalid choice: 'lion'"),
        (["--steps", "0"], "steps=0: must be an int >= 1"),
    ],
)
def test_finetune_bad_input_is_one_line(ids_file, tmp_path, change, message):
    args = _args(ids_file, tmp_path / "run")
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
