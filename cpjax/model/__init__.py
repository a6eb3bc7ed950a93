"""Models: the functional Flax Llama."""

from cpjax.model.llama import Llama, Output, PastKV, init_params, param_shapes

__all__ = ["Llama", "Output", "PastKV", "init_params", "param_shapes"]
