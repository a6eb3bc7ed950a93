"""Models: the functional Flax Llama and its parameter table."""

from cpjax.model.decoder import (
    Decoder,
    Output,
    PastKV,
    init_params,
    param_axes,
    param_count,
    param_shapes,
)

__all__ = [
    "Decoder",
    "Output",
    "PastKV",
    "init_params",
    "param_axes",
    "param_count",
    "param_shapes",
]
