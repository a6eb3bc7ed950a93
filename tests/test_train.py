"""Fine-tuning: packed batches, exact gradients through every ring, optax steps.

Every parallel gradient is checked against single-device autodiff of the model with the
plain-jnp reference attention (fp32, tiny model), on a packed batch whose documents have odd
lengths (padding in every layout chunk) and a padded tail.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpjax.attention import reference, with_past
from cpjax.config import PRESETS
from cpjax.engine import ContextParallel, SingleDevice
from cpjax.errors import CpjaxError, NonFiniteError
from cpjax.model.decoder import Decoder
from cpjax.parallel.mesh import make_mesh
from cpjax.train import OptimizerConfig, Trainer, pack_batch
from cpjax.train.batch import PackedBatch

CFG = PRESETS["tiny"]
ROW = 37  # tokens per row: odd, not a multiple of 2N for any N > 1


def _packed_tokens(seed=0, rows=2):
    """``rows`` rows of ROW tokens: row 0 holds one document and 4 padding slots, row 1 two
    documents (20 and 17 tokens)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, ROW))
    segments = np.zeros((rows, ROW), int)
    segments[0, ROW - 4 :] = -1
    segments[1:, 20:] = 1
    return tokens, segments


@pytest.fixture(scope="module")
def batch():
    return pack_batch(*_packed_tokens())


def reference_loss(params, batch: PackedBatch):
    """Mean next-token NLL of the packed row by the single-device reference model."""
    model = Decoder(CFG, with_past(reference.attend))
    rows = [jnp.asarray(x) for x in (batch.tokens, batch.positions, batch.segments)]
    hidden = model.apply({"params": params}, *rows).hidden
    logits = model.apply({"params": params}, hidden, method=Decoder.logits)
    logprobs = jax.nn.log_softmax(logits)[jnp.arange(batch.targets.size), batch.targets]
    return -jnp.sum(logprobs * batch.weights) / batch.weights.sum()


def reference_grads_of(params, batch):
    return jax.value_and_grad(reference_loss)(params, batch)


@pytest.fixture(scope="module")
def reference_grads(tiny_params, batch):
    return reference_grads_of(tiny_params, batch)


def assert_trees_close(got, want, rtol=1e-5):
    """Every leaf within ``rtol`` of the leaf's largest magnitude (gradients near 0 are
    compared on the scale of their tensor)."""
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        scale = np.abs(w).max() + 1e-30
        assert np.abs(g - w).max() <= rtol * scale, (jax.tree_util.keystr(path), g, w)


# ---------------------------------------------------------------------------- batches
def test_pack_batch_targets_are_the_next_token_of_the_same_document():
    tokens = np.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    segments = np.array([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    b = pack_batch(tokens, segments)
    np.testing.assert_array_equal(b.positions, [0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(b.segments, [0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(b.weights, [1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b.targets, [11, 12, 0, 14, 0, 0, 21, 22, 23, 24, 25, 0])
    assert b.n_targets == 8


def test_pack_batch_loss_mask_keeps_only_completion_targets():
    tokens = np.arange(6)[None]
    completion = np.array([[0, 0, 0, 1, 1, 1]], bool)  # a prompt of 3 tokens, then the answer
    b = pack_batch(tokens, loss_mask=completion)
    np.testing.assert_array_equal(b.weights, [0, 0, 1, 1, 1, 0])  # predict tokens 3, 4, 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=np.zeros((2, 1))), "S >= 2"),
        (dict(tokens=np.zeros((2, 3, 4))), r"expected \[B, S\]"),
        (dict(tokens=np.zeros((1, 4)), segments=np.array([[0, 1, 0, 0]])), "contiguous run"),
        (dict(tokens=np.zeros((1, 4)), segments=np.zeros((1, 5))), "differs"),
        (dict(tokens=np.full((1, 4), 300), vocab_size=256), "outside the vocabulary"),
    ],
)
def test_pack_batch_rejects_bad_input(kwargs, match):
    with pytest.raises(CpjaxError, match=match):
        pack_batch(**kwargs)


# ---------------------------------------------------------------------------- gradients
MESHES = [
    (1, 1, "pass_kv"),
    (2, 1, "pass_kv"),
    (2, 1, "pass_q"),
    (4, 1, "pass_q"),
    (4, 1, "all_gather"),
    (8, 1, "pass_kv"),
    (4, 2, "pass_kv"),
]
SLOW_MESHES = [
    (2, 1, "all_gather"),
    (4, 1, "pass_kv"),
    (8, 1, "pass_q"),
    (8, 1, "all_gather"),
    (4, 2, "pass_q"),
    (4, 2, "all_gather"),
]


def _placement(context, tensor, strategy):
    if context * tensor == 1:
        return SingleDevice(prefill_chunk=None)
    return ContextParallel(make_mesh(context, tensor), strategy=strategy)


@pytest.mark.parametrize(
    "context, tensor, strategy",
    MESHES + [pytest.param(*m, marks=pytest.mark.slow) for m in SLOW_MESHES],
)
def test_loss_and_grads_equal_single_device_reference(
    tiny_params, batch, reference_grads, context, tensor, strategy
):
    """The packed batch on a (context x tensor) mesh: loss to 1e-6, every parameter's
    gradient to 1e-5 of its scale, against autodiff of the reference model."""
    trainer = Trainer(CFG, _placement(context, tensor, strategy))
    state = trainer.init_state(tiny_params)
    loss, grads = trainer.loss_and_grads(state.params, [batch])
    want_loss, want_grads = reference_grads
    assert abs(float(loss) - float(want_loss)) <= 1e-6 * abs(float(want_loss))
    assert_trees_close(jax.tree.map(np.asarray, grads), want_grads)


WINDOWED = dataclasses.replace(CFG, sliding_window=5, layer_types=("sliding", "full"))


@pytest.mark.parametrize(
    "context, strategy",
    [
        (1, "pass_kv"),
        (4, "pass_kv"),
        (4, "pass_q"),
        pytest.param(8, "pass_kv", marks=pytest.mark.slow),
    ],
)
def test_sliding_window_layers_train_exactly(tiny_params, batch, context, strategy):
    """A model whose first layer slides (window 5, smaller than a layout chunk at N = 4) and
    whose second is global: loss and gradients equal the reference model's autodiff (the
    same window per layer) on one device and through the rings' backward."""
    model = Decoder(WINDOWED, with_past(reference.attend))

    def loss(params):
        rows = [jnp.asarray(x) for x in (batch.tokens, batch.positions, batch.segments)]
        hidden = model.apply({"params": params}, *rows).hidden
        logits = model.apply({"params": params}, hidden, method=Decoder.logits)
        logprobs = jax.nn.log_softmax(logits)[jnp.arange(batch.targets.size), batch.targets]
        return -jnp.sum(logprobs * batch.weights) / batch.weights.sum()

    want_loss, want_grads = jax.value_and_grad(loss)(tiny_params)
    _, full_grads = reference_grads_of(tiny_params, batch)
    layer_0 = lambda g: np.asarray(g["layers"]["wq"])[0]  # noqa: E731
    scale = np.abs(layer_0(want_grads)).max()
    assert np.abs(layer_0(want_grads) - layer_0(full_grads)).max() > 0.1 * scale  # it slides
    trainer = Trainer(WINDOWED, _placement(context, 1, strategy))
    got_loss, got_grads = trainer.loss_and_grads(trainer.init_state(tiny_params).params, [batch])
    assert abs(float(got_loss) - float(want_loss)) <= 1e-6 * abs(float(want_loss))
    assert_trees_close(jax.tree.map(np.asarray, got_grads), want_grads)


@pytest.mark.parametrize(
    "context, strategy",
    [(1, "pass_kv"), (2, "pass_kv"), pytest.param(2, "pass_q", marks=pytest.mark.slow)],
)
def test_pallas_attention_grads_equal_single_device_reference(
    tiny_params, batch, reference_grads, context, strategy
):
    """``attention="pallas"`` (interpreted on CPU): its custom VJP on one device, its backward
    kernel in the hand-written backward of the pass-KV and pass-Q rings on two ranks."""
    trainer = Trainer(CFG, _placement(context, 1, strategy), attention="pallas")
    state = trainer.init_state(tiny_params)
    loss, grads = trainer.loss_and_grads(state.params, [batch])
    want_loss, want_grads = reference_grads
    assert abs(float(loss) - float(want_loss)) <= 1e-6 * abs(float(want_loss))
    assert_trees_close(jax.tree.map(np.asarray, grads), want_grads)


def test_dots_remat_and_grad_accumulation_give_the_same_gradient(tiny_params, reference_grads):
    """Two micro-batches (one row each) accumulate to the gradient of the batch of both rows;
    ``remat="dots"`` changes what is kept, not the result."""
    tokens, segments = _packed_tokens()
    micro = [pack_batch(tokens[i : i + 1], segments[i : i + 1]) for i in range(2)]
    trainer = Trainer(CFG, _placement(2, 1, "pass_kv"), remat="dots")
    state = trainer.init_state(tiny_params)
    loss, grads = trainer.loss_and_grads(state.params, micro)
    want_loss, want_grads = reference_grads
    assert abs(float(loss) - float(want_loss)) <= 1e-6 * abs(float(want_loss))
    assert_trees_close(jax.tree.map(np.asarray, grads), want_grads)


# ---------------------------------------------------------------------------- optimizer steps
@pytest.fixture(scope="module")
def sgd_trainer():
    return Trainer(CFG, optimizer=OptimizerConfig("sgd", learning_rate=0.5))


def test_sgd_step_is_exactly_params_minus_lr_times_grad(tiny_params, batch, sgd_trainer):
    """Plain SGD: the new parameters are ``p - lr * grad`` of the same step's gradient (to 2
    float32 units in the last place of the tensor's largest entry: no momentum, decay or
    clipping), and the caller's parameters survive the step's buffer donation."""
    state = sgd_trainer.init_state(tiny_params)
    _, grads = sgd_trainer.loss_and_grads(state.params, [batch])
    want = jax.tree.map(
        lambda p, g: np.asarray(p) - np.float32(0.5) * np.asarray(g), tiny_params, grads
    )
    new, metrics = sgd_trainer.step(state, [batch], consumed=2)
    for got, exp in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
        ulp = np.spacing(np.abs(exp).max())  # XLA may compute g / n as g * (1 / n)
        np.testing.assert_allclose(np.asarray(got), exp, rtol=0, atol=2 * ulp)
    assert not jax.tree.leaves(tiny_params)[0].is_deleted()
    assert (new.step, new.data_position) == (1, 2)
    assert metrics.n_targets == batch.n_targets and metrics.learning_rate == 0.5
    assert np.isclose(
        metrics.grad_norm, float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    )


def test_a_mesh_step_never_donates_the_callers_parameters(tiny_params, batch):
    """Placing parameters of device 0 on a mesh may reuse their buffers on device 0; the
    state is then copied, so a step's donation leaves the caller's arrays alive (a second
    trainer can start from them)."""
    for _ in range(2):
        trainer = Trainer(CFG, _placement(2, 1, "pass_kv"))
        state, _ = trainer.step(trainer.init_state(tiny_params), [batch])
        jax.block_until_ready(state.params)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(tiny_params))


def test_a_few_adamw_steps_lower_the_loss(tiny_params, batch):
    opt = OptimizerConfig(
        "adamw",
        3e-3,
        weight_decay=0.01,
        warmup_steps=2,
        schedule="cosine",
        total_steps=6,
        max_grad_norm=1.0,
    )
    trainer = Trainer(CFG, optimizer=opt)
    state = trainer.init_state(tiny_params)
    losses, rates = [], []
    for _ in range(6):
        state, metrics = trainer.step(state, [batch])
        losses.append(metrics.loss)
        rates.append(metrics.learning_rate)
    assert rates[0] == 0.0 and rates[2] == pytest.approx(3e-3) and rates[-1] < rates[2]
    assert losses[-1] < losses[0] - 0.05, losses


def test_adamw_state_is_split_over_the_context_ranks(tiny_params, batch, tmp_path):
    """ZeRO stage 1 on 4 context x 2 tensor ranks: a device holds at most 1/4 of each of
    AdamW's moments (its tensor shard, if any, split over the context ranks) while the
    parameters stay whole on every context rank; three steps equal one device's (moments to
    1e-5; the parameters' updates to 1e-3: Adam divides by the gradients' scale, so
    components with gradients near 0 amplify the rings' 1e-7 rounding differences); the
    split state saves and restores in place."""
    from cpjax.train import state as state_lib
    from cpjax.train.data import TokenStream

    opt = OptimizerConfig("adamw", 1e-2, weight_decay=0.01, max_grad_norm=1.0)
    single, split = (
        Trainer(CFG, optimizer=opt),
        Trainer(CFG, _placement(4, 2, "pass_kv"), optimizer=opt),
    )
    states = [trainer.init_state(tiny_params) for trainer in (single, split)]
    for _ in range(3):
        states = [trainer.step(s, [batch])[0] for trainer, s in zip((single, split), states)]
    want, got = states
    assert_trees_close(got.opt_state, want.opt_state)
    update = lambda state: jax.tree.map(lambda p, p0: np.asarray(p) - p0, state.params, tiny_params)  # noqa: E731
    assert_trees_close(update(got), update(want), rtol=1e-3)

    def bytes_on_device_0(tree):
        return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))

    moments = [x for x in jax.tree.leaves(got.opt_state) if x.ndim]
    assert all(bytes_on_device_0(x) * 4 <= x.nbytes for x in moments)
    params_on_0 = bytes_on_device_0(got.params)
    assert sum(x.nbytes for x in jax.tree.leaves(got.params)) / 2 <= params_on_0

    data = TokenStream(np.arange(100) % 256, 10).fingerprint()
    state_lib.save(str(tmp_path / "run"), got, split, data)
    back = state_lib.restore(str(tmp_path / "run"), split, split.init_state(tiny_params), data)
    for restored, saved in zip(jax.tree.leaves(back.opt_state), jax.tree.leaves(got.opt_state)):
        assert restored.sharding == saved.sharding
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved))


def test_non_finite_loss_stops_and_names_the_step(tiny_params, batch, sgd_trainer):
    broken = jax.tree.map(np.asarray, tiny_params)
    broken["final_norm"] = np.full_like(broken["final_norm"], np.nan)
    state = sgd_trainer.init_state(broken)
    match = r"step 1: the loss is nan \(not finite\); lower the learning"
    with pytest.raises(NonFiniteError, match=match):
        sgd_trainer.step(state, [batch])


def test_check_mode_names_the_first_non_finite_layer(tiny_params, batch):
    """A NaN in layer 1's MLP weights: check mode names that layer and the parameter."""
    broken = jax.tree.map(np.array, tiny_params)
    broken["layers"]["w_up"][1, 3, 5] = np.nan
    trainer = Trainer(CFG, optimizer=OptimizerConfig("sgd", 0.5), check_finite=True)
    with pytest.raises(NonFiniteError, match=r"first appears in layer 1 \(MLP\).*w_up"):
        trainer.step(trainer.init_state(broken), [batch])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="lion"), "optimizer"),
        (dict(learning_rate=0.0), "learning_rate=0.0"),
        (dict(learning_rate=-1e-3), "must be a finite number > 0"),
        (dict(weight_decay=0.1), "sgd takes no weight decay"),
        (dict(schedule="cosine", total_steps=None), "needs total_steps"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
    ],
)
def test_optimizer_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(CpjaxError, match=match):
        OptimizerConfig(**kwargs)


def test_trainer_rejects_bad_settings_and_batches(tiny_params):
    with pytest.raises(CpjaxError, match="no backward pass"):
        Trainer(CFG, attention="pallas_mgpu")
    with pytest.raises(CpjaxError, match="remat"):
        Trainer(CFG, remat="none")
    trainer = Trainer(dataclasses.replace(CFG, max_seq_len=16))
    state = trainer.init_state(tiny_params)
    with pytest.raises(CpjaxError, match="exceeds the model's window of 16"):
        trainer.step(state, [pack_batch(np.zeros((1, 20), int))])
    with pytest.raises(CpjaxError, match="no target tokens"):
        trainer.step(state, [pack_batch(np.zeros((1, 4), int), np.array([[0, 1, 2, 3]]))])


# ---------------------------------------------------------------------------- memory
def _compiled_grad_step(tiny_params, context: int, tokens: int, strategy: str = "pass_kv"):
    """The compiled gradient program of one ``tokens``-long sequence on ``context`` ranks."""
    trainer = Trainer(CFG, _placement(context, 1, strategy))
    state = trainer.init_state(tiny_params)
    batch = pack_batch(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, tokens)))
    program = trainer._grad_program(strategy, state.params)
    return program.lower(state.params, *trainer._rows(batch)).compile()


def test_compiled_step_memory_is_the_temp_memory_of_the_grad_program(tiny_params):
    context = 2
    trainer = Trainer(CFG, _placement(context, 1, "pass_kv"))
    state = trainer.init_state(tiny_params)
    batch = pack_batch(np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 256)))
    want = _compiled_grad_step(tiny_params, context, 256).memory_analysis().temp_size_in_bytes
    assert trainer.compiled_step_memory(state.params, batch) == want > 0


def _largest_square_dims(hlo: str) -> int:
    """The largest ``n`` such that some array in ``hlo`` has two dimensions >= ``n``."""
    best = 0
    for dims in re.findall(r"\[([0-9]+(?:,[0-9]+)+)\]", hlo):
        sizes = sorted((int(d) for d in dims.split(",")), reverse=True)
        best = max(best, sizes[1])
    return best


@pytest.mark.slow
def test_train_step_memory_shrinks_with_the_context_ranks(tiny_params):
    """An 8K-token train step: no array anywhere has two dimensions as long as a rank's rows
    (no score matrix), and each of 8 ranks needs at most 1/5 of one device's temporary memory
    (pass-KV 0.17, pass-Q 0.19). One device's memory is linear in the tokens (with the
    attention kept for the backward, it was the whole score matrix). The rings' loops hold
    two K/V (or query) blocks at a time: unrolled, every rank's block was at hand (0.21)."""
    tokens = 8192
    single = _compiled_grad_step(tiny_params, 1, tokens)
    assert _largest_square_dims(single.as_text()) < tokens
    one_device = single.memory_analysis().temp_size_in_bytes
    assert one_device <= 9 * 1024 * tokens, one_device  # linear: 8.5 KB a token, not T x T
    for strategy in ("pass_kv", "pass_q"):
        compiled = _compiled_grad_step(tiny_params, 8, tokens, strategy)
        assert _largest_square_dims(compiled.as_text()) < tokens // 8
        per_rank = compiled.memory_analysis().temp_size_in_bytes
        assert per_rank <= one_device / 5, (strategy, per_rank, one_device)


def test_resume_refuses_another_models_state(tiny_params, tmp_path):
    """A run saved for one model is not resumed by a trainer of another (a one-line error
    naming the differing fields), before any array is read."""
    from cpjax.train import state as state_lib
    from cpjax.train.data import TokenStream

    trainer = Trainer(CFG)
    state = trainer.init_state(tiny_params)
    data = TokenStream(np.arange(100) % 256, 10).fingerprint()
    state_lib.save(str(tmp_path / "run"), state, trainer, data)
    other = Trainer(dataclasses.replace(CFG, ffn_dim=96))
    with pytest.raises(CpjaxError, match=r"other settings: model: ffn_dim=128 \(expected 96\)"):
        state_lib.restore(str(tmp_path / "run"), other, state, data)
