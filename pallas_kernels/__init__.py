"""Pallas attention kernels returning the log-sum-exp (GPU via Triton; CPU via interpret mode)."""

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention

__all__ = ["decode_attention", "flash_attention"]
