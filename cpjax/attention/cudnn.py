"""``attend`` through ``jax.nn.dot_product_attention`` (cuDNN's fused attention), for comparison.

cuDNN cannot take cpjax's position/segment rule directly, so the visibility mask is built from
the positions and segments and passed as ``mask`` (cuDNN turns it into a bias). The softmax
statistics come back through ``return_residual=True`` (natural-log LSE per query and head).
A query that sees no key gets ``out = 0, lse = -inf`` like every other implementation.
``implementation="cudnn"`` needs an NVIDIA GPU; ``"xla"`` runs the same wrapper anywhere, which
is how it is tested on CPU.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from cpjax.attention.masks import check_attend_inputs, visibility_mask
from cpjax.errors import CpjaxError


def attend(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    *,
    window: Optional[int] = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    implementation: str = "cudnn",
):
    """Same contract as ``cpjax.attention.reference.attend`` (``q [Tq, Hq, D]``,
    ``k, v [Tk, Hkv, D]``; returns ``out [Tq, Hq, D]``, ``lse [Tq, Hq]`` float32); cuDNN picks
    its own tiles, so ``block_q, block_k`` are ignored."""
    check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise CpjaxError(
            "attention implementation 'cudnn' needs an NVIDIA GPU (backend is "
            f"{jax.default_backend()!r}); use 'auto', 'blockwise' or 'pallas'"
        )
    mask = visibility_mask(q_pos, kv_pos, q_seg, kv_seg, window)  # [Tq, Tk]
    dtype = q.dtype if implementation != "cudnn" else jnp.bfloat16
    out, lse = jax.nn.dot_product_attention(
        q[None].astype(dtype),
        k[None].astype(dtype),
        v[None].astype(dtype),
        mask=mask[None, None],
        implementation=implementation,
        return_residual=True,
    )
    seen = mask.any(axis=1)[:, None]  # [Tq, 1]
    out = jnp.where(seen[..., None], out[0], 0).astype(q.dtype)
    lse = jnp.where(seen, lse[0].astype(jnp.float32), -jnp.inf)
    return out, lse
