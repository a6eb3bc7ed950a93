"""One SGD step of cpjax's trainer equals one PyTorch autograd step of HF transformers.

A tiny random Llama checkpoint (the ``tiny`` preset with noise on every leaf, exported to an HF
directory) takes one step ``p -= lr * p.grad`` in PyTorch (:func:`torch_sgd_step`, run once per
module) and one step of :class:`cpjax.train.Trainer` with plain SGD, single-device and under
context (and tensor) parallelism. The losses agree to 1e-4 (relative), and every tensor's
*update* ``p_new - p0`` agrees to 1e-3 in relative L2: the gradients of cpjax's rings match
torch autograd, not just cpjax's own reference.
"""

import jax
import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.engine import ContextParallel, SingleDevice
from cpjax.loaders import export_hf, load_safetensors
from cpjax.parallel.mesh import make_mesh
from cpjax.train import OptimizerConfig, Trainer, pack_batch
from cpjax.train.trainer import local_params
from tests.hf_training_oracle import torch_sgd_step
from tests.test_export import _random_params

pytestmark = pytest.mark.oracle

LEARNING_RATE = 0.1  # large enough that every update stands well above float32 noise
ROWS, ROW = 2, 37  # odd row length: padding in every context-parallel layout chunk
LOSS_RTOL = 1e-4
UPDATE_RTOL = 1e-3
# cold compiles on 2 CPU cores: ~35 s for the torch step and single device, ~45 s for CP=8 and
# ~35 s for CP=4 x TP=2 (marked slow)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An HF directory holding the tiny Llama with random weights (untied embeddings)."""
    config = PRESETS["tiny"]
    directory = tmp_path_factory.mktemp("oracle") / "model"
    export_hf(directory, config, _random_params(config))
    return directory


@pytest.fixture(scope="module")
def tokens():
    """``[ROWS, ROW]`` random token ids, one document per row."""
    return np.random.default_rng(3).integers(0, PRESETS["tiny"].vocab_size, (ROWS, ROW))


@pytest.fixture(scope="module")
def torch_step(model_dir, tokens, tmp_path_factory):
    """PyTorch's loss before the step and its updated parameters (read back by cpjax)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out_dir = tmp_path_factory.mktemp("oracle") / "stepped"
    loss = torch_sgd_step(model_dir, tokens, LEARNING_RATE, out_dir)
    return loss, load_safetensors(out_dir)[1]


def _placement(context: int, tensor: int, strategy: str):
    """Single device for a 1 x 1 mesh, else context parallelism on a (context x tensor) mesh."""
    if context * tensor == 1:
        return SingleDevice(prefill_chunk=None)
    return ContextParallel(make_mesh(context, tensor), strategy=strategy)


def _cpjax_sgd_step(model_dir, tokens, placement):
    """cpjax's loss before one SGD step on ``tokens`` and the parameters before and after it."""
    config, params = load_safetensors(model_dir)
    trainer = Trainer(
        config, placement, optimizer=OptimizerConfig("sgd", learning_rate=LEARNING_RATE)
    )
    state, metrics = trainer.step(trainer.init_state(params), [pack_batch(tokens)])
    return metrics.loss, params, local_params(state)


def _update_errors(before, ours, theirs) -> dict[str, float]:
    """Per tensor: ``||(ours - before) - (theirs - before)|| / ||theirs - before||``."""
    errors = {}
    for (path, p0), a, b in zip(
        jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(ours), jax.tree.leaves(theirs)
    ):
        p0, a, b = (np.asarray(x, np.float64) for x in (p0, a, b))
        want = b - p0
        assert np.linalg.norm(want) > 0, f"{jax.tree_util.keystr(path)}: torch did not move it"
        errors[jax.tree_util.keystr(path)] = float(
            np.linalg.norm((a - p0) - want) / np.linalg.norm(want)
        )
    return errors


@pytest.mark.parametrize(
    "context, tensor, strategy",
    [
        pytest.param(1, 1, None, id="single"),
        pytest.param(8, 1, "pass_kv", id="cp8-pass_kv"),
        pytest.param(4, 2, "pass_q", id="cp4xtp2-pass_q", marks=pytest.mark.slow),
    ],
)
def test_sgd_step_equals_torch_autograd(model_dir, tokens, torch_step, context, tensor, strategy):
    """cpjax's step on a (context x tensor) mesh: loss to 1e-4 and every tensor's update to
    1e-3 (relative L2) of PyTorch's ``p -= lr * p.grad``."""
    torch_loss, torch_params = torch_step
    loss, before, after = _cpjax_sgd_step(model_dir, tokens, _placement(context, tensor, strategy))
    assert jax.tree.structure(after) == jax.tree.structure(torch_params)
    assert abs(loss - torch_loss) <= LOSS_RTOL * abs(torch_loss), (loss, torch_loss)
    errors = _update_errors(before, after, torch_params)
    worst = max(errors, key=errors.get)
    print(f"loss {loss:.7f} vs torch {torch_loss:.7f}; worst update {worst}: {errors[worst]:.2e}")
    assert errors[worst] <= UPDATE_RTOL, errors
