"""Models: the functional Flax Llama and its parameter table."""

from cpjax.model.llama import (
    Llama,
    Output,
    PastKV,
    init_params,
    param_axes,
    param_count,
    param_shapes,
)

__all__ = ["Llama", "Output", "PastKV", "init_params", "param_axes", "param_count", "param_shapes"]
