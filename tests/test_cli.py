"""The command line: outputs, and one-line errors with exit status 2 for user mistakes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.engine import Engine
from tests.conftest import compile_cache_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
    """``python -m cpjax ARGS`` in a fresh process (its own XLA flags, the tests' cache)."""
    env = dict(os.environ, **compile_cache_env())
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "cpjax", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def test_generate_json_on_tiny():
    result = run_cli(
        "generate", "--model", "tiny", "--prompt", "hello", "--max-new-tokens", "6", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 6 and isinstance(out["text"], str)


@pytest.mark.parametrize(
    "mesh", [[], ["--fake-devices", "8", "--context", "4", "--tensor", "2", "--strategy", "pass_q"]]
)
def test_score_writes_the_log_probabilities(tmp_path, tiny_params, mesh):
    ids = np.random.default_rng(0).integers(0, 256, 50).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    result = run_cli(
        "score",
        "--model",
        "tiny",
        "--ids-file",
        str(tmp_path / "ids.npy"),
        "--out",
        str(tmp_path / "lp.npy"),
        *mesh,
    )
    assert result.returncode == 0, result.stderr
    lp = np.load(tmp_path / "lp.npy")
    assert lp.shape == (49,) and lp.dtype == np.float32
    np.testing.assert_allclose(lp, Engine(PRESETS["tiny"], tiny_params).score(ids), atol=1e-5)


def _bad_inputs(tmp_path):
    np.save(tmp_path / "neg.npy", np.array([1, -2, 3], np.int32))
    np.save(tmp_path / "big.npy", np.array([1, 999], np.int32))
    np.save(tmp_path / "float.npy", np.array([1.0, 2.5]))
    np.save(tmp_path / "ok.npy", np.arange(10, dtype=np.int32))
    (tmp_path / "long.txt").write_text("x" * 17000)
    (tmp_path / "empty.txt").write_text("   \n")
    gen = ["generate", "--model", "tiny"]
    score = ["score", "--model", "tiny", "--out", str(tmp_path / "o.npy")]
    return [
        (["generate", "--model", "nosuch", "--prompt", "x"], "unknown model preset 'nosuch'"),
        (["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "x"], "does not exist"),
        (gen + ["--prompt-file", str(tmp_path / "nofile.txt")], "no such file"),
        (gen + ["--prompt-file", str(tmp_path / "empty.txt")], "the prompt is empty"),
        (gen + ["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens=-1: must be >= 0"),
        (gen + ["--prompt-file", str(tmp_path / "long.txt")], "context window of 16384"),
        (gen + ["--prompt", "x", "--chat"], "no chat template"),
        (score + ["--ids-file", str(tmp_path / "neg.npy")], "token id -2 at index 1"),
        (score + ["--ids-file", str(tmp_path / "big.npy")], "token id 999 at index 1 is outside"),
        (score + ["--ids-file", str(tmp_path / "float.npy")], "must be integers"),
        (
            gen + ["--prompt", "x", "--fake-devices", "8", "--context", "3"],
            "does not divide the 8 available devices",
        ),
        (
            gen + ["--prompt", "x", "--fake-devices", "8", "--context", "2", "--tensor", "4"],
            "tensor=4 does not divide n_kv_heads=2",
        ),
        (gen + ["--prompt", "x", "--temperature", "-1"], "--temperature=-1.0: must be"),
        (gen + ["--prompt", "x", "--top-p", "1.5"], "--top-p=1.5: must be in (0, 1]"),
        (gen + ["--prompt", "x", "--top-k", "-3"], "--top-k=-3: must be an integer >= 0"),
        (
            gen + ["--prompt", "x", "--fake-devices", "2", "--context", "2", "--hardware", "a100"],
            "unknown hardware 'a100'",
        ),
        (
            score + ["--ids-file", str(tmp_path / "ok.npy"), "--split-at", "9"],
            "split points must increase strictly within [1, 8]",
        ),
        (
            score + ["--ids-file", str(tmp_path / "ok.npy"), "--split-at", "a,b"],
            "--split-at 'a,b': expected integers",
        ),
        (["chat", "--model", "tiny"], "has no chat template"),
    ]


def _assert_one_line_error(args, status, stderr, message):
    assert status == 2, (args, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], (args, stderr)
    assert "Traceback" not in stderr, stderr


@pytest.fixture
def kept_environment():
    """``cli.main`` sets XLA/JAX variables for its own process; restore them afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
def test_user_mistakes_are_one_line_errors_with_status_2(tmp_path, capsys, kept_environment):
    """Every case through ``cli.main`` in this process (jax already has 8 CPU devices); the
    first two also as real processes, to cover the interpreter's exit path."""
    from cpjax.cli import main

    cases = _bad_inputs(tmp_path)
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        _assert_one_line_error(args, exit_info.value.code, capsys.readouterr().err, message)
    for args, message in cases[:2]:
        result = run_cli(*args)
        _assert_one_line_error(args, result.returncode, result.stderr, message)


def test_non_llama_gguf_is_rejected(tmp_path, tiny_params):
    from tests.test_loaders import _write_tiny_gguf

    _write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_params, arch="gpt2", quantize_ffn=False)
    result = run_cli("generate", "--model", str(tmp_path / "gpt2.gguf"), "--prompt", "x")
    assert result.returncode == 2 and "architecture is 'gpt2'" in result.stderr


def test_score_split_at_three_turns_on_a_mesh_equals_one_shot(tmp_path, tiny_params):
    ids = np.random.default_rng(1).integers(0, 256, 70).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    result = run_cli(
        "score",
        "--model",
        "tiny",
        "--ids-file",
        str(tmp_path / "ids.npy"),
        "--out",
        str(tmp_path / "lp.npy"),
        "--split-at",
        "20,33",
        "--fake-devices",
        "8",
        "--context",
        "4",
        "--strategy",
        "auto",
        "--decode-strategy",
        "ring_pass_q",
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "lp.npy"), Engine(PRESETS["tiny"], tiny_params).score(ids), atol=1e-5
    )


def test_stop_string_ends_the_text_before_it():
    base = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "abc",
        "--max-new-tokens",
        "24",
        "--json",
        "--temperature",
        "0.9",
        "--seed",
        "7",
    ]
    free = json.loads(run_cli(*base).stdout)["text"]
    stop = free[10:12]
    cut = json.loads(run_cli(*base, "--stop", stop).stdout)["text"]
    assert cut == free[: free.index(stop)]


@pytest.mark.slow
def test_chat_keeps_the_cache_between_turns_on_8_devices():
    """Two turns with the real SmolLM2 on a context-parallel mesh; the answers stay on topic."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpjax",
            "chat",
            "--fake-devices",
            "8",
            "--context",
            "8",
            "--max-new-tokens",
            "24",
        ],
        input="What is the capital of France?\nWhat is the capital of Italy?\n",
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )
    assert result.returncode == 0, result.stderr
    replies = [l for l in result.stdout.splitlines() if l.strip()]
    assert "Paris" in replies[0] and "Rome" in replies[1], result.stdout
    turns = [l for l in result.stderr.splitlines() if l.startswith("[turn")]
    assert len(turns) == 2 and "time to first token" in turns[0], result.stderr
