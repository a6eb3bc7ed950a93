"""Self-check of the PyTorch training oracle (``tests/hf_training_oracle.py``): its loss is
cpjax's mean next-token NLL, a step with learning rate 0 reads back bit for bit, and a real step
moves every parameter and lowers the loss (tied and untied embeddings)."""

import dataclasses

import jax
import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.engine import Engine
from cpjax.loaders import export_hf, load_safetensors
from tests.hf_training_oracle import torch_sgd_step
from tests.test_export import _random_params

pytestmark = pytest.mark.oracle


def _mean_nll(config, params, tokens) -> float:
    """cpjax's mean next-token NLL over the ``B * (S - 1)`` pairs of ``tokens [B, S]``."""
    engine = Engine(config, params)
    return -float(np.concatenate([engine.score(row) for row in tokens]).mean())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sgd_step_reads_back_into_cpjax(tmp_path, tied):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    config = dataclasses.replace(PRESETS["tiny"], tie_embeddings=tied)
    params = _random_params(config)
    export_hf(tmp_path / "model", config, params)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 12)).astype(np.int32)

    loss = torch_sgd_step(tmp_path / "model", tokens, 0.0, tmp_path / "same")
    assert abs(loss - _mean_nll(config, params, tokens)) < 1e-5
    same_config, same = load_safetensors(tmp_path / "same")
    assert dataclasses.replace(same_config, name=config.name) == config
    assert jax.tree.structure(same) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(same), jax.tree.leaves(params)):
        assert got.tobytes() == np.asarray(want).tobytes()

    assert torch_sgd_step(tmp_path / "model", tokens, 0.1, tmp_path / "step") == loss
    _, stepped = load_safetensors(tmp_path / "step")
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), stepped, params)
    assert all(jax.tree.leaves(moved)), moved
    assert _mean_nll(config, stepped, tokens) < loss
