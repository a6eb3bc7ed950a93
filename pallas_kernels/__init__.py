"""Pallas attention kernels returning the log-sum-exp, and the flash backward (GPU via Triton,
Hopper via Mosaic GPU; CPU via interpret mode)."""

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention_bwd import flash_attention_grads
from pallas_kernels.flash_attention_mgpu import flash_attention_mgpu

__all__ = [
    "decode_attention",
    "flash_attention",
    "flash_attention_grads",
    "flash_attention_mgpu",
]
