"""Fine-tuning under context parallelism: packed batches, exact gradients through the rings,
optax updates, resumable training state."""

from cpjax.train.batch import PackedBatch, pack_batch
from cpjax.train.optimizer import OptimizerConfig, make_optimizer
from cpjax.train.trainer import StepMetrics, Trainer, TrainState

__all__ = [
    "OptimizerConfig",
    "PackedBatch",
    "StepMetrics",
    "TrainState",
    "Trainer",
    "make_optimizer",
    "pack_batch",
]
