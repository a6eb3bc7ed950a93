"""Fine-tuning over a placement: the loss of a packed batch, its exact gradient, an optax step.

``Trainer(config, placement, optimizer)`` trains on the same placements the inference engine
runs on (``SingleDevice()`` or ``ContextParallel(mesh, strategy)``): the batch is one packed row
(:mod:`cpjax.train.batch`) laid out over the context ranks like a prefill, the forward is the
model with the prefill ring as its attention, and the gradient is autodiff of that forward,
whose attention rings carry their exact hand-written backward (``cpjax.parallel.ring``). So the
gradient of a long sequence never needs its activations on one device, and it equals the
single-device gradient up to float rounding.

The compiled pieces:

* ``nll`` (``jit(shard_map(...))`` on a mesh): one rank's rows through the model, its summed
  weighted next-token NLL, summed over the ranks: a replicated scalar.
* ``grad``: ``value_and_grad`` of ``nll`` wrt the float32 master parameters (cast to the compute
  dtype inside), for one micro-batch. Summed NLLs and their gradients add up exactly over
  micro-batches, so gradient accumulation is a sum, divided once by the batch's target count.
* ``apply``: gradient / target count, the optax update, the new parameters (donated).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cpjax.config import ModelConfig
from cpjax.dispatch import get_attention
from cpjax.engine import validation as check
from cpjax.engine.placement import ContextParallel, SingleDevice
from cpjax.engine.steps import Forward, run, token_logprobs
from cpjax.errors import NonFiniteError, require
from cpjax.model.decoder import check_param_shapes, leaves_by_name
from cpjax.names import ATTENTION_IMPLEMENTATIONS, REMAT, check_choice
from cpjax.parallel.distributed import fetch
from cpjax.train.batch import PackedBatch
from cpjax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from cpjax.xla_env import CPU_COLLECTIVES_FLAG

Placement = Union[SingleDevice, ContextParallel]

#: Implementations with a backward pass (``AttentionImpl.grads`` or plain autodiff).
DIFFERENTIABLE = ("blockwise", "pallas", "reference")


class TrainState(NamedTuple):
    """Everything a run resumes from.

    Attributes:
      step: optimizer steps taken.
      params: float32 master parameters (placed like the engine's).
      opt_state: the optax state; on a mesh its parameter-shaped arrays are split over the
        context ranks (``ContextParallel.optimizer_state_shardings``).
      data_position: sequences of the data stream consumed so far.
    """

    step: int
    params: Any
    opt_state: Any
    data_position: int = 0


class StepMetrics(NamedTuple):
    """What one optimizer step reports (host floats)."""

    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    n_targets: int
    n_tokens: int


def nll_body(fwd: Forward, strategy: str, params, tokens, targets, weights, positions, segments):
    """Summed weighted next-token NLL of the packed row over all ranks (a scalar).

    Per rank: ``tokens, targets, positions, segments [T]`` int32, ``weights [T]`` float32."""
    model = fwd.ring(strategy)
    hidden = run(model, params, tokens, positions, segments).hidden
    logprobs = token_logprobs(model, params, hidden, targets)
    return fwd.ranks.sum(-jnp.sum(logprobs * weights))


def _buffers(x) -> set:
    """The device buffer addresses behind ``x`` (empty for a host array)."""
    if not isinstance(x, jax.Array):
        return set()
    return {shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards}


def _shares_a_buffer(placed, original) -> bool:
    """Whether ``placed`` (a placed parameter) holds any buffer of ``original`` (the
    caller's)."""
    return placed is original or bool(_buffers(placed) & _buffers(original))


@dataclasses.dataclass
class Trainer:
    """Fine-tuning of one model on one placement.

    Attributes:
      config: the model shapes.
      placement: ``SingleDevice()`` or ``ContextParallel(mesh, strategy)``; ``strategy="auto"``
        asks the paper's heuristic once per sequence length.
      optimizer: what updates the parameters (:class:`OptimizerConfig`).
      dtype: compute dtype of the forward and backward (``float32`` or ``bfloat16``); the
        master parameters and optimizer state stay float32.
      remat: what each layer keeps for the backward: ``full`` (its input) or ``dots`` (also
        the projections' outputs); see ``cpjax.model.decoder.REMAT_POLICIES``.
      attention: ``auto`` (blockwise), ``blockwise`` or ``reference``.
      bucket: packed rows are padded to a multiple of this many rows (fewer compiled shapes).
      check_finite: on a non-finite loss, replay the batch layer by layer on one device and
        name the first stage (and parameters) where NaN/Inf appears.
    """

    config: ModelConfig
    placement: Placement = dataclasses.field(
        default_factory=lambda: SingleDevice(prefill_chunk=None)
    )
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    dtype: Any = jnp.float32
    remat: str = "full"
    attention: str = "auto"
    bucket: int = 64
    check_finite: bool = False

    def __post_init__(self):
        check.model_and_placement(self.config, self.placement)
        require(
            isinstance(self.optimizer, OptimizerConfig),
            f"optimizer: expected an OptimizerConfig, got {type(self.optimizer).__name__}",
        )
        self.dtype = check.dtype(self.dtype)
        check_choice("remat policy", self.remat, REMAT)
        check_choice("attention implementation", self.attention, ATTENTION_IMPLEMENTATIONS)
        name = "blockwise" if self.attention == "auto" else self.attention
        require(
            name in DIFFERENTIABLE,
            f"attention={self.attention!r} has no backward pass; train with one of "
            f"{', '.join(DIFFERENTIABLE)}",
        )
        require(
            isinstance(self.bucket, int) and self.bucket >= 1,
            f"bucket={self.bucket!r}: must be an int >= 1",
        )
        _check_cpu_collectives(self.placement)
        self.impl = get_attention(name)
        self.forward = dataclasses.replace(
            self.placement.forward(self.config, self.dtype, self.impl), remat=self.remat
        )
        self.tx = make_optimizer(self.optimizer)
        self._programs: dict = {}

    # ----------------------------------------------------------------- state
    def init_state(self, params) -> TrainState:
        """Step 0: ``params`` as float32 masters on the placement, a fresh optimizer state."""
        require(
            isinstance(params, dict),
            f"params: expected the parameter dict of a loader or init_params, got "
            f"{type(params).__name__}",
        )
        check_param_shapes(
            self.config, {name: np.shape(x) for name, x in leaves_by_name(params).items()}
        )
        placed = self.placement.place_params(params, self.config, jnp.float32)
        # The steps donate the state: never the caller's buffers. Placing may return a
        # caller's array, or place it on a mesh reusing its buffer for the device it is on;
        # only those are copied (a copy of all would double a replicated model's memory).
        params = jax.tree.map(
            lambda p, x: jnp.copy(p) if _shares_a_buffer(p, x) else p, placed, params
        )
        return TrainState(step=0, params=params, opt_state=self._init_optimizer(params))

    def _optimizer_shardings(self, params):
        """The sharding of every array of the optimizer state of ``params`` (placed), or
        ``None`` where the placement leaves it to the parameters'."""
        by_param = self.placement.optimizer_state_shardings(params, self.config)
        if by_param is None:
            return None
        replicated = NamedSharding(self.placement.mesh, P())
        return optax.tree_map_params(
            self.tx,
            lambda _, sharding: sharding,
            jax.eval_shape(self.tx.init, params),
            by_param,
            transform_non_params=lambda _: replicated,
        )

    def _init_optimizer(self, params):
        return jax.jit(self.tx.init, out_shardings=self._optimizer_shardings(params))(params)

    # ----------------------------------------------------------------- compiled pieces
    def strategy_for(self, n_tokens: int) -> str:
        """The ring a row of ``n_tokens`` trains with (forward and backward)."""
        return self.placement.strategy_for(n_tokens, 0, self.config, self.dtype)

    def _grad_program(self, strategy: str, params):
        """``(params, *rows) -> (summed NLL, its gradient)``, compiled once per ring."""
        key = ("grad", strategy)
        if key not in self._programs:
            nll = self.placement.compile(
                functools.partial(nll_body, self.forward, strategy),
                ("params", *["rows"] * 5),
                ("replicated",),
                self.config,
                params,
            )
            dtype = self.dtype

            def value_and_grad(params, *rows):
                cast = lambda p: jax.tree.map(lambda x: x.astype(dtype), p)  # noqa: E731
                return jax.value_and_grad(lambda p: nll(cast(p), *rows))(params)

            self._programs[key] = jax.jit(value_and_grad)
        return self._programs[key]

    def _apply(self, state: TrainState):
        """``(params, opt_state, grad_sum, n_targets) -> (params, opt_state, grad_norm)``
        compiled for states placed like ``state``: on a mesh the new state keeps the old
        one's shardings (the optimizer state split over the ranks, the parameters
        replicated), so each rank updates its slice of the state and XLA gathers the update."""
        if "apply" not in self._programs:

            def apply(params, opt_state, grad_sum, n_targets):
                grads = jax.tree.map(lambda g: g / n_targets, grad_sum)
                updates, opt_state = self.tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, optax.global_norm(grads)

            placed = {}
            if self._optimizer_shardings(state.params) is not None:
                shardings = jax.tree.map(lambda x: x.sharding, (state.params, state.opt_state))
                placed["out_shardings"] = (*shardings, NamedSharding(self.placement.mesh, P()))
            self._programs["apply"] = jax.jit(apply, donate_argnums=(0, 1, 2), **placed)
        return self._programs["apply"]

    @functools.cached_property
    def _accumulate(self):
        return jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,))

    def _rows(self, batch: PackedBatch) -> list:
        """The batch's real slots laid out over the ranks (each document balanced on its
        own), the padding dropped (the layout pads as it needs)."""
        real = batch.segments >= 0
        layout = self.placement.row_layout(
            batch.positions[real], batch.segments[real], self.bucket, self.impl
        )
        return self.placement.put(
            "rows",
            *(layout.shard(x[real]) for x in (batch.tokens, batch.targets, batch.weights)),
            layout.positions,
            layout.segments,
        )

    # ----------------------------------------------------------------- public API
    def check_batch(self, batch: PackedBatch) -> None:
        """Raise unless ``batch`` is a packed batch this model can train on."""
        require(
            isinstance(batch, PackedBatch),
            f"batch: expected a PackedBatch (cpjax.train.pack_batch), got {type(batch).__name__}",
        )
        longest = int(np.bincount(batch.segments[batch.segments >= 0]).max(initial=0))
        require(
            longest <= self.config.max_seq_len,
            f"a document of {longest} tokens exceeds the model's window of "
            f"{self.config.max_seq_len} (max_seq_len of {self.config.name!r})",
        )
        top = int(batch.tokens.max(initial=0))
        require(
            top < self.config.vocab_size,
            f"tokens: id {top} is outside the vocabulary [0, {self.config.vocab_size})",
        )

    def nll_and_grads(self, params, batches: Sequence[PackedBatch]):
        """Summed NLL, summed gradient and target count over ``batches`` (micro-batches)."""
        require(len(batches) >= 1, "batches: need at least one (micro-)batch")
        total, grad_sum, n_targets = 0.0, None, 0
        for batch in batches:
            self.check_batch(batch)
            strategy = self.strategy_for(batch.tokens.size)
            nll, grads = self._grad_program(strategy, params)(params, *self._rows(batch))
            total = total + nll
            grad_sum = grads if grad_sum is None else self._accumulate(grad_sum, grads)
            n_targets += batch.n_targets
        require(
            n_targets > 0,
            "the batch has no target tokens (every document is a single token, or the loss "
            "mask excludes every token)",
        )
        return total, grad_sum, n_targets

    def compiled_step_memory(self, params, batch: PackedBatch) -> int:
        """Temporary bytes per device of the compiled gradient program of ``batch`` (one
        micro-batch) on ``params`` (e.g. ``state.params``): XLA's ``memory_analysis`` of the
        program a step runs, not counting its arguments (parameters, rows) or outputs. It
        compiles the program ahead of time (another compile than the step's own)."""
        self.check_batch(batch)
        program = self._grad_program(self.strategy_for(batch.tokens.size), params)
        compiled = program.lower(params, *self._rows(batch)).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    def loss_and_grads(self, params, batches: Sequence[PackedBatch]):
        """The mean next-token NLL over all targets of ``batches`` and its gradient wrt
        ``params`` (a pytree like ``params``, float32)."""
        total, grad_sum, n_targets = self.nll_and_grads(params, batches)
        return total / n_targets, jax.tree.map(lambda g: g / n_targets, grad_sum)

    def _first_nonfinite(self, state: TrainState, batches) -> Callable[[], Optional[str]]:
        """In check mode, where the forward of ``batches`` first turns non-finite (lazily)."""

        def locate() -> Optional[str]:
            if not self.check_finite:
                return None
            from cpjax.model.diagnostics import first_nonfinite

            params = local_params(state)
            for batch in batches:
                where = first_nonfinite(
                    self.config, params, batch.tokens, batch.positions, batch.segments,
                    dtype=self.dtype,
                )  # fmt: skip
                if where:
                    return where
            return None

        return locate

    def learning_rate(self, step: int) -> float:
        """The rate of optimizer step ``step`` (0-based)."""
        rate = learning_rate_schedule(self.optimizer)
        return float(rate(step) if callable(rate) else rate)

    def step(self, state: TrainState, batches: Sequence[PackedBatch], consumed: int = 0):
        """One optimizer step on the micro-batches ``batches`` (their targets averaged
        together). ``consumed``: data sequences they hold (advances ``data_position``).

        Returns ``(TrainState, StepMetrics)``; raises :class:`NonFiniteError` naming the step
        when the loss or the gradient is not finite (the state is then unchanged).
        """
        total, grad_sum, n_targets = self.nll_and_grads(state.params, batches)
        loss = float(fetch(total)) / n_targets
        require_finite(loss, state.step, "loss", self._first_nonfinite(state, batches))
        params, opt_state, grad_norm = self._apply(state)(
            state.params, state.opt_state, grad_sum, jnp.float32(n_targets)
        )
        grad_norm = float(fetch(grad_norm))
        metrics = StepMetrics(
            step=state.step + 1,
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=self.learning_rate(state.step),
            n_targets=n_targets,
            n_tokens=int(sum((b.segments >= 0).sum() for b in batches)),
        )
        require_finite(grad_norm, state.step, "gradient norm")
        new = TrainState(state.step + 1, params, opt_state, state.data_position + consumed)
        return new, metrics


def _check_cpu_collectives(placement: Placement) -> None:
    """A multi-rank train step on CPU needs :data:`cpjax.xla_env.CPU_COLLECTIVES_FLAG` (else
    the CPU runtime can abort the process in the backward's rings)."""
    if placement.n_ranks == 1 or jax.default_backend() != "cpu":
        return
    require(
        CPU_COLLECTIVES_FLAG in os.environ.get("XLA_FLAGS", "").split(),
        f"training on {placement.n_ranks} CPU devices needs XLA_FLAGS to hold "
        f"{CPU_COLLECTIVES_FLAG} before jax starts (cpjax.parallel.mesh.use_fake_cpu_devices "
        f"and --fake-devices set it)",
    )


def require_finite(value: float, step: int, what: str, locate=None) -> None:
    """Raise :class:`NonFiniteError` if ``value`` (the ``what`` of optimizer step ``step``,
    0-based) is NaN/Inf; ``locate()`` (check mode) names where it first appears."""
    if math.isfinite(value):
        return
    where = locate() if locate is not None else None
    found = (
        f"; it first appears in {where}"
        if where
        else "; lower the learning rate, clip the gradient (max_grad_norm) or train in float32"
        " (check mode names the first non-finite layer)"
    )
    raise NonFiniteError(f"step {step + 1}: the {what} is {value} (not finite){found}")


def local_params(state: TrainState):
    """Host copies of the master parameters (numpy)."""
    return jax.tree.map(fetch, state.params)


__all__ = [
    "DIFFERENTIABLE",
    "StepMetrics",
    "TrainState",
    "Trainer",
    "local_params",
    "nll_body",
    "require_finite",
]
