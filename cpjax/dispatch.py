"""Attention implementations by name: the one place above ``cpjax.attention`` and the kernels.

``get_attention(name)`` returns an :class:`AttentionImpl`: the contract function

    attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, window=None, block_q=..., block_k=...)
      -> (out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32)

with the row granularity of its blocks (``tile``) and its preferred block sizes, so that a
caller that lays rows out in chunks (the context-parallel ring) can hand it blocks that never
straddle two chunks. The implementations (names in ``cpjax.names.ATTENTION_IMPLEMENTATIONS``):

* ``reference`` — dense jnp oracle (materialises the scores; tests and short inputs);
* ``blockwise`` — online softmax over key blocks in plain XLA, skipping masked blocks;
* ``pallas`` — the Pallas kernels of ``pallas_kernels`` (flash attention for prefill, split-K
  for a few queries against a long cache; the flash backward for gradients and the rings'
  backward); interpreted on CPU, compiled (Triton) on GPU;
* ``pallas_mgpu`` — like ``pallas``, with the Hopper flash kernel (Pallas Mosaic GPU: TMA,
  ``wgmma``) for prefill; bf16/fp16, head_dim a multiple of 64; interpreted on CPU;
* ``cudnn`` — ``jax.nn.dot_product_attention(implementation="cudnn")`` with the mask built from
  positions and segments (GPU only; bf16; for comparison);
* ``auto`` — ``pallas`` on GPU, ``blockwise`` elsewhere.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax

import pallas_kernels
from cpjax.attention import blockwise, cudnn, reference
from cpjax.attention.layer_view import materializing
from cpjax.attention.plans import skipping_invisible
from cpjax.errors import require
from cpjax.names import ATTENTION_IMPLEMENTATIONS, check_choice
from pallas_kernels.flash_attention_mgpu import BLOCK_Q as MGPU_BLOCK_Q

DECODE_MAX_QUERIES = 16  # at most this many queries: the split-K decode kernel
#: The 64-row tile of the flash kernels: Triton's default blocks, the Hopper ``wgmma`` rows.
KERNEL_TILE = 64


class AttentionImpl(NamedTuple):
    """One implementation of the ``attend`` contract.

    Attributes:
      name: its name (``auto`` resolved).
      attend: the contract function; takes keywords ``window``, ``block_q``, ``block_k``.
      tile: the row granularity of its blocks: every block size it is given (and its
        defaults) is a multiple of ``tile``. Rows laid out in chunks that are multiples of
        ``tile`` can be cut into blocks that never straddle two chunks. 1 for the dense paths.
      block_q, block_k: the block sizes it uses by default (multiples of ``tile``); ``None``
        for the dense paths, which take the whole input as one block and ignore block sizes.
      grads: its flash-style backward, ``grads(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out,
        lse, d_out, d_lse, *, window, block_q, block_k) -> (dq, dk, dv)`` float32 (see
        ``cpjax.attention.blockwise.attend_grads``): a key set's part of the gradients of an
        attention result ``(out, lse)`` over a superset. The pass-KV ring's backward is built
        from it; ``None``: the rings are differentiated by autodiff, if at all.
      grad_block_k: the key blocks ``grads`` uses by default (a multiple of ``tile``);
        ``None``: ``block_k``.
    """

    name: str
    attend: Callable
    tile: int
    block_q: Optional[int]
    block_k: Optional[int]
    grads: Optional[Callable] = None
    grad_block_k: Optional[int] = None


def pallas_attend(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    *,
    window: Optional[int] = None,
    block_q: int = KERNEL_TILE,
    block_k: int = KERNEL_TILE,
):
    """``attend`` by the Pallas kernels: split-K decode for few queries, flash otherwise.

    ``block_q, block_k`` are the flash kernel's blocks (powers of two >= 16 on a GPU). The
    decode kernel cuts the keys by its own cache splits: it runs only for at most
    ``DECODE_MAX_QUERIES`` queries, fewer than one tile.

    Differentiable (``jax.custom_vjp``): the backward is the Pallas flash backward
    :func:`pallas_grads` with the same blocks, whichever kernel ran forward.
    """
    return _pallas_attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k)


def _pallas_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k):
    """:func:`pallas_attend` with positional static arguments."""
    if q.shape[0] <= DECODE_MAX_QUERIES:
        return pallas_kernels.decode_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)
    return pallas_kernels.flash_attention(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window, block_q=block_q, block_k=block_k
    )


def pallas_grads(
    *arrays,
    window: Optional[int] = None,
    block_q: int = KERNEL_TILE,
    block_k: int = KERNEL_TILE,
):
    """:attr:`AttentionImpl.grads` of ``pallas``: ``pallas_kernels.flash_attention_grads``
    of ``arrays = (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out, d_lse)`` (shapes and
    semantics of ``cpjax.attention.blockwise.attend_grads``; blocks as for
    :func:`pallas_attend`'s flash kernel). Returns ``(dq, dk, dv)`` float32. (Looked up at call
    time, so tests can replace the kernel.)"""
    return pallas_kernels.flash_attention_grads(
        *arrays, window=window, block_q=block_q, block_k=block_k
    )


_pallas_attend = blockwise.flash_vjp(_pallas_forward, pallas_grads)


def pallas_mgpu_attend(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    *,
    window: Optional[int] = None,
    block_q: int = MGPU_BLOCK_Q,
    block_k: int = KERNEL_TILE,
):
    """``attend`` with the Hopper (Mosaic GPU) flash kernel; few queries go to
    :func:`pallas_attend` (its split-K decode kernel).

    The kernel's query blocks are one ``wgmma`` tile (``block_q`` must be 64); ``block_k`` is
    a multiple of 64.
    """
    if q.shape[0] <= DECODE_MAX_QUERIES:
        return pallas_attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window)
    require(
        block_q == MGPU_BLOCK_Q,
        f"block_q={block_q}: the Hopper kernel's query blocks are {MGPU_BLOCK_Q} rows",
    )
    return pallas_kernels.flash_attention_mgpu(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, window=window, block_k=block_k
    )


# Every implementation but the Hopper kernel is guarded by ``skipping_invisible``: a part no
# query can see (a ring step outside every window) runs no attention at all. The Hopper kernel
# gets the guard's effect from its visit lists (no block of such a part is listed); a
# ``lax.cond`` around it would also break the vmap emulation of ranks its interpreter needs.
# A KV cache reaches attention as layer views (``cpjax.attention.layer_view``): ``blockwise``
# reads them in place, the others get the layer materialised.
_IMPLS = {
    "reference": AttentionImpl(
        "reference", materializing(skipping_invisible(reference.attend)), 1, None, None
    ),
    "cudnn": AttentionImpl("cudnn", materializing(skipping_invisible(cudnn.attend)), 1, None, None),
    "blockwise": AttentionImpl(
        "blockwise",
        skipping_invisible(blockwise.attend),
        KERNEL_TILE,
        blockwise.BLOCK_Q,
        blockwise.BLOCK_K,
        blockwise.attend_grads,
        blockwise.GRAD_BLOCK_K,
    ),
    "pallas": AttentionImpl(
        "pallas",
        materializing(skipping_invisible(pallas_attend)),
        KERNEL_TILE,
        KERNEL_TILE,
        KERNEL_TILE,
        pallas_grads,
    ),
    "pallas_mgpu": AttentionImpl(
        "pallas_mgpu", materializing(pallas_mgpu_attend), KERNEL_TILE, MGPU_BLOCK_Q, KERNEL_TILE
    ),
}


def get_attention(name: str = "auto") -> AttentionImpl:
    """The implementation called ``name`` (one of ``ATTENTION_IMPLEMENTATIONS``); ``auto`` is
    ``pallas`` on a GPU backend and ``blockwise`` elsewhere."""
    check_choice("attention implementation", name, ATTENTION_IMPLEMENTATIONS)
    if name == "auto":
        name = "pallas" if jax.default_backend() == "gpu" else "blockwise"
    return _IMPLS[name]


def get_attend(name: str = "auto") -> Callable:
    """The bare ``attend`` function of :func:`get_attention` ``(name)`` (the single-device
    plan ``cpjax.attention.with_past`` takes a function)."""
    return get_attention(name).attend


__all__ = [
    "AttentionImpl",
    "DECODE_MAX_QUERIES",
    "KERNEL_TILE",
    "get_attend",
    "get_attention",
    "pallas_attend",
    "pallas_grads",
    "pallas_mgpu_attend",
]
