"""Optimizers of fine-tuning: an ``optax`` transformation from a few explicit settings.

``OptimizerConfig(name="sgd", learning_rate=lr)`` with nothing else is exactly
``p <- p - lr * grad`` (no momentum, no weight decay, no clipping, constant rate). ``adamw``
adds decoupled weight decay; any optimizer can take a linear warm-up from 0, a cosine decay
to 0 over the remaining steps, and clipping by the global gradient norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import optax

from cpjax.errors import require
from cpjax.names import OPTIMIZERS, SCHEDULES, check_choice


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What updates the parameters.

    Attributes:
      name: ``sgd`` or ``adamw``.
      learning_rate: the peak rate (> 0).
      weight_decay: decoupled weight decay of ``adamw`` (``sgd`` takes none).
      warmup_steps: linear warm-up from 0 to ``learning_rate`` over this many steps.
      schedule: after the warm-up, ``constant`` or ``cosine`` (decay to 0 at ``total_steps``).
      total_steps: the run's length in optimizer steps (needed by ``cosine``).
      max_grad_norm: clip the gradient to this global L2 norm first (None: no clipping).
      b1, b2, eps: Adam's moment decays and epsilon.
    """

    name: str = "sgd"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: Optional[int] = None
    max_grad_norm: Optional[float] = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        check_choice("optimizer", self.name, OPTIMIZERS)
        check_choice("learning-rate schedule", self.schedule, SCHEDULES)
        lr = self.learning_rate
        require(
            isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
            f"learning_rate={lr!r}: must be a finite number > 0",
        )
        require(self.weight_decay >= 0, f"weight_decay={self.weight_decay!r}: must be >= 0")
        require(
            self.name != "sgd" or self.weight_decay == 0,
            f"weight_decay={self.weight_decay!r}: sgd takes no weight decay (use adamw)",
        )
        require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"warmup_steps={self.warmup_steps!r}: must be an int >= 0",
        )
        require(
            self.total_steps is None
            or (isinstance(self.total_steps, int) and self.total_steps >= 1),
            f"total_steps={self.total_steps!r}: must be an int >= 1",
        )
        require(
            self.schedule != "cosine"
            or (self.total_steps is not None and self.total_steps > self.warmup_steps),
            f"schedule='cosine' needs total_steps > warmup_steps (got total_steps="
            f"{self.total_steps}, warmup_steps={self.warmup_steps})",
        )
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm={self.max_grad_norm!r}: must be > 0 (or None: no clipping)",
        )


def learning_rate_schedule(config: OptimizerConfig):
    """The rate as a float (constant, no warm-up) or an ``optax`` schedule of the step."""
    lr = float(config.learning_rate)
    if config.warmup_steps == 0 and config.schedule == "constant":
        return lr
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, config.warmup_steps, config.total_steps, end_value=0.0
        )
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, config.warmup_steps), optax.constant_schedule(lr)],
        [config.warmup_steps],
    )


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The ``optax`` transformation ``config`` describes."""
    rate = learning_rate_schedule(config)
    if config.name == "sgd":
        update = optax.sgd(rate)
    else:
        update = optax.adamw(
            rate, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
        )
    if config.max_grad_norm is None:
        return update
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), update)
