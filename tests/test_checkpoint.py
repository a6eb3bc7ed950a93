"""Checkpoints: bit-identical round trips, resharding on load, atomic saves that survive SIGKILL,
clear errors for incomplete, corrupt or mismatched checkpoints, and the ``convert`` command."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from cpjax.config import PRESETS, ModelConfig, config_from_dict, config_to_dict
from cpjax.engine import ContextParallel, Engine
from cpjax.errors import CpjaxError
from cpjax.loaders import load_model
from cpjax.loaders.byte_tokenizer import ByteTokenizer
from cpjax.loaders.checkpoint import (
    MARKER,
    PAUSE_ENV,
    backup_path,
    load_checkpoint,
    save_checkpoint,
    staging_path,
)
from cpjax.model.decoder import param_axes, param_count, param_shapes
from cpjax.parallel.mesh import make_mesh
from cpjax.parallel.sharding import tree_specs
from tests.conftest import REAL_MODELS
from tests.test_cli import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = PRESETS["tiny"]
IDS = np.random.default_rng(1).integers(0, 256, 77).astype(np.int32)
#: Big enough (~165 MB in float32) that orbax takes a while to write it.
BIG = ModelConfig(
    name="big",
    vocab_size=32768,
    dim=512,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    head_dim=64,
    ffn_dim=2048,
)


def assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()


def random_params(config: ModelConfig, seed: int):
    """Float32 numpy params of ``config`` (random, cheap: no model init)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), param_shapes(config))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_params):
    """A tiny-model checkpoint (float32, byte tokenizer), saved once for the module."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_checkpoint(path, CFG, tiny_params, ByteTokenizer())
    return path


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_configs_round_trip_through_json(name):
    config = PRESETS[name]
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_a_config_dict_with_unknown_or_missing_fields_is_an_error():
    data = config_to_dict(CFG)
    with pytest.raises(CpjaxError, match="model config: unknown field.s. colour"):
        config_from_dict({**data, "colour": "red"})
    with pytest.raises(CpjaxError, match="model config: missing field.s. dim"):
        config_from_dict({k: v for k, v in data.items() if k != "dim"})
    with pytest.raises(CpjaxError, match="rope_scaling: unknown field.s. beta"):
        config_from_dict({**data, "rope_scaling": {"factor": 8.0, "beta": 1}})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_identical_and_keeps_the_dtype(tmp_path, tiny_params, dtype):
    params = jax.tree.map(lambda x: x.astype(dtype), tiny_params)
    save_checkpoint(tmp_path / "c", CFG, params, ByteTokenizer())
    config, restored, tokenizer = load_checkpoint(tmp_path / "c")
    assert config == CFG and isinstance(tokenizer, ByteTokenizer)
    assert_bit_identical(restored, params)
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no staging or backup left behind


def test_saving_again_replaces_the_checkpoint(tmp_path, tiny_params):
    save_checkpoint(tmp_path / "c", CFG, random_params(CFG, 5))
    save_checkpoint(tmp_path / "c", CFG, tiny_params)
    _, restored, tokenizer = load_checkpoint(tmp_path / "c")
    assert_bit_identical(restored, tiny_params)
    assert tokenizer is None and sorted(os.listdir(tmp_path)) == ["c"]


@pytest.mark.parametrize("context,tensor", [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)])
def test_restore_onto_a_mesh_reshards_and_scores_like_one_device(saved, single, context, tensor):
    mesh = make_mesh(context, tensor)
    config, params, _ = load_checkpoint(saved, mesh=mesh)
    specs = tree_specs(param_axes(config), params)
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(specs)):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, s), x.ndim)
    wq = params["layers"]["wq"]  # [L, D, Hq, Dh], heads split over tensor
    assert wq.addressable_shards[0].data.shape == (2, 64, 4 // tensor, 16)
    engine = Engine(config, params, ContextParallel(mesh=mesh))
    # The engine keeps the restored arrays where they are: no gather onto one device.
    assert all(a is b for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(params)))
    np.testing.assert_allclose(engine.score(IDS), single.score(IDS), atol=1e-5)


def test_restore_onto_given_shardings(saved, tiny_params):
    mesh = make_mesh(8, 1)
    shardings = jax.tree.map(
        lambda x: NamedSharding(mesh, jax.sharding.PartitionSpec()), tiny_params
    )
    _, params, _ = load_checkpoint(saved, shardings=shardings)
    assert all(
        x.sharding == NamedSharding(mesh, jax.sharding.PartitionSpec())
        for x in jax.tree.leaves(params)
    )
    assert_bit_identical(params, tiny_params)


# ----------------------------------------------------------------------------- errors
def test_another_model_config_is_an_error_naming_the_fields(saved):
    other = dataclasses.replace(CFG, name="other", n_layers=3, rope_theta=500000.0)
    with pytest.raises(
        CpjaxError,
        match=r"another model config.*n_layers=2 \(expected 3\); "
        r"rope_theta=10000.0 \(expected 500000.0\)",
    ):
        load_checkpoint(saved, expected_config=other)
    load_checkpoint(saved, expected_config=dataclasses.replace(CFG, name="renamed"))


def test_params_that_do_not_match_the_config_are_refused(tmp_path, tiny_params):
    with pytest.raises(
        CpjaxError,
        match=r"params do not match model config 'smollm2-135m'.*"
        r"embed has shape \(256, 64\), the config needs "
        r"\(49152, 576\)",
    ):
        save_checkpoint(tmp_path / "c", PRESETS["smollm2-135m"], tiny_params)
    assert not os.path.exists(tmp_path / "c")


def test_a_marker_whose_config_disagrees_with_the_params_is_an_error(tmp_path, tiny_params):
    save_checkpoint(tmp_path / "c", CFG, tiny_params)
    marker = tmp_path / "c" / MARKER
    meta = json.loads(marker.read_text())
    meta["config"]["ffn_dim"] = 96
    marker.write_text(json.dumps(meta))
    with pytest.raises(
        CpjaxError,
        match=r"params do not match model config 'tiny': "
        r"layers/w_down has shape \(2, 128, 64\), the config "
        r"needs \(2, 96, 64\)",
    ):
        load_checkpoint(tmp_path / "c")


def test_a_tensor_axis_that_does_not_divide_the_heads_is_an_error(saved):
    with pytest.raises(
        CpjaxError,
        match=r"cannot shard parameter layers/wk of shape "
        r"\(2, 64, 2, 16\) over mesh axis 'tensor' of size 4",
    ):
        load_checkpoint(saved, mesh=make_mesh(2, 4))


def test_incomplete_and_corrupt_checkpoints_are_clear_errors(tmp_path, tiny_params):
    with pytest.raises(CpjaxError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(tmp_path / "c", CFG, tiny_params)
    chunks = [
        f
        for f in glob.glob(str(tmp_path / "c" / "params" / "**"), recursive=True)
        if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f
    ]
    assert chunks
    for chunk in chunks:  # truncate the array data
        os.truncate(chunk, os.path.getsize(chunk) // 2)
    with pytest.raises(CpjaxError, match="the params are unreadable or corrupt"):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / MARKER).write_text('{"format": "cpjax-checkpoint", "vers')
    with pytest.raises(CpjaxError, match="marker .* is unreadable or corrupt"):
        load_checkpoint(tmp_path / "c")
    os.remove(tmp_path / "c" / MARKER)
    with pytest.raises(CpjaxError, match=f"is incomplete .* it has no {MARKER}"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(CpjaxError, match="is incomplete"):  # --model DIR says the same
        load_model(str(tmp_path / "c"))


def test_a_folder_that_is_not_a_checkpoint_is_never_replaced(tmp_path, tiny_params):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(CpjaxError, match="is not a complete cpjax checkpoint.*refusing"):
        save_checkpoint(tmp_path / "c", CFG, tiny_params)
    assert os.listdir(tmp_path / "c") == ["notes.txt"]


# ----------------------------------------------------------------------------- atomicity
_SAVE_SCRIPT = textwrap.dedent("""
    import sys
    from tests.test_checkpoint import BIG, random_params
    from cpjax.loaders.checkpoint import save_checkpoint
    save_checkpoint(sys.argv[1], BIG, random_params(BIG, 0))
""")


def start_save(path, pause_at=None) -> subprocess.Popen:
    """A child process that saves the ~165 MB ``BIG`` model at ``path``."""
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    env["JAX_PLATFORMS"] = "cpu"
    if pause_at is not None:
        env[PAUSE_ENV] = pause_at
    return subprocess.Popen(
        [sys.executable, "-c", _SAVE_SCRIPT, str(path)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    child.stderr.close()


def wait_for_pause(child: subprocess.Popen, stage: str) -> None:
    for line in child.stderr:
        if f"cpjax-checkpoint paused at {stage}" in line:
            return
    raise AssertionError(f"the save exited (status {child.wait()}) without pausing at {stage}")


def test_a_save_killed_while_writing_leaves_the_previous_checkpoint(tmp_path, tiny_params):
    path = tmp_path / "c"
    save_checkpoint(path, CFG, tiny_params, ByteTokenizer())
    child = start_save(path)
    deadline = time.monotonic() + 240
    while not (os.path.isdir(staging_path(str(path))) and os.listdir(staging_path(str(path)))):
        assert child.poll() is None and time.monotonic() < deadline, "the save never started"
        time.sleep(0.005)
    kill(child)  # orbax has begun writing the params
    assert not os.path.exists(os.path.join(staging_path(str(path)), MARKER))
    config, params, _ = load_checkpoint(path)
    assert config == CFG
    assert_bit_identical(params, tiny_params)
    save_checkpoint(path, CFG, tiny_params)  # the next save cleans up the partial one
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_a_save_killed_before_the_swap_leaves_the_previous_checkpoint(tmp_path, tiny_params):
    path = tmp_path / "c"
    save_checkpoint(path, CFG, tiny_params)
    child = start_save(path, pause_at="staged")
    wait_for_pause(child, "staged")  # the new checkpoint is complete beside it
    kill(child)
    assert os.path.isfile(os.path.join(staging_path(str(path)), MARKER))
    config, params, _ = load_checkpoint(path)
    assert config == CFG
    assert_bit_identical(params, tiny_params)


def test_a_save_killed_between_the_renames_is_recovered(tmp_path, tiny_params):
    path = tmp_path / "c"
    save_checkpoint(path, CFG, tiny_params)
    child = start_save(path, pause_at="swapping")
    wait_for_pause(child, "swapping")
    kill(child)
    assert not os.path.exists(path) and os.path.isdir(backup_path(str(path)))
    config, params, _ = load_checkpoint(path)  # read from the backup
    assert config == CFG
    assert_bit_identical(params, tiny_params)
    assert load_model(str(path))[0] == CFG
    other = random_params(CFG, 7)
    save_checkpoint(path, CFG, other)  # recovers, then replaces
    assert_bit_identical(load_checkpoint(path)[1], other)
    assert sorted(os.listdir(tmp_path)) == ["c"]


# ----------------------------------------------------------------------------- CLI, SmolLM2
def test_cli_convert_then_score_from_the_checkpoint(tmp_path, single):
    result = run_cli("convert", "--model", "tiny", "--out", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["params"] == param_count(CFG) and summary["bytes"] == 4 * param_count(CFG)
    assert summary["path"] == str(tmp_path / "c") and summary["seconds"] > 0
    np.save(tmp_path / "ids.npy", IDS)
    result = run_cli(
        "score",
        "--model",
        str(tmp_path / "c"),
        "--ids-file",
        str(tmp_path / "ids.npy"),
        "--out",
        str(tmp_path / "lp.npy"),
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "lp.npy"), single.score(IDS), atol=1e-5)


def test_cli_convert_to_bfloat16(tmp_path):
    result = run_cli(
        "convert", "--model", "tiny", "--out", str(tmp_path / "c"), "--dtype", "bfloat16"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes"] == 2 * param_count(CFG)
    _, params, _ = load_checkpoint(tmp_path / "c")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


@REAL_MODELS
def test_smollm2_converts_and_reloads_equal(tmp_path):
    config, params, tokenizer = load_model("smollm2-135m")
    save_checkpoint(tmp_path / "c", config, params, tokenizer)
    config2, params2, tokenizer2 = load_model(str(tmp_path / "c"))
    assert config2 == config
    assert_bit_identical(params2, params)
    text = "Hi <|im_start|>user\n2² is ½ of 8, café 😀<|im_end|>"
    assert tokenizer2.encode(text) == tokenizer.encode(text)
    assert (
        tokenizer2.bos_id,
        tokenizer2.eos_ids,
        tokenizer2.special_tokens,
        tokenizer2.add_bos_token,
    ) == (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.special_tokens, tokenizer.add_bos_token)
    messages = [{"role": "user", "content": "hello"}]
    assert tokenizer2.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
