"""Pallas flash attention backward: ``(dq, dk, dv)`` of ``flash_attention``'s ``(out, lse)``.

``flash_attention_grads(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, d_out, d_lse)`` has
the contract of ``cpjax.attention.blockwise.attend_grads``: ``(out, lse)`` is attention of
``q`` over a set of keys that contains ``k, v`` (all of them for a VJP, the union over the ranks
of a ring), and the result is this key set's part of ``dq`` and its whole ``dk, dv``::

    P = exp(S - lse)    dP = dO V^T    delta = rowsum(dO * O)
    dS = P * (dP + d_lse - delta)    dQ = dS K / sqrt(D)    dK = dS^T Q / sqrt(D)    dV = P^T dO

Rows with ``lse = -inf`` (they see no key; ``(out, lse)`` is a constant ``(0, -inf)``) get no
gradient and their cotangents are ignored (no NaN).

Kernel structure (FA2; Pallas GPU / Triton lowering, ``interpret=True`` runs it on CPU), two
``pallas_call`` s that share the inputs and need no atomics:

* ``cpjax_flash_attention_dkdv`` — grid ``(key blocks, KV heads)``: a program keeps one K/V
  tile and its float32 ``dk, dv`` accumulators, loops over the query blocks and, inside, over
  the ``G`` query heads of its KV head (GQA without repeating K/V, and without a ``[Tk, Hq, D]``
  buffer to sum afterwards);
* ``cpjax_flash_attention_dq`` — grid ``(query blocks, query heads)``, like the forward: a loop
  over key blocks accumulates ``dq``.

Both recompute ``P`` in base 2 from the forward's ``lse`` with the mask
``cpjax.attention.masks.visibility_mask`` and skip (``lax.cond``) the block pairs that
``masks.may_overlap`` proves invisible, as the forward does. ``delta`` and the row term
``d_lse - delta`` are computed in plain jnp before the kernels (one ``[Tq, Hq]`` vector).
Lengths are padded to the blocks with segment ``PAD_SEGMENT``. The dots run in the dtype of
``q`` (``d_out`` is cast to it; ``P`` and ``dS`` too before their dots) with float32
accumulation: exact float32 for float32 inputs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from cpjax.attention.masks import bounds, check_attend_inputs, may_overlap, visibility_mask
from cpjax.attention.padding import pad_kv_rows, pad_query_rows, pad_rows
from pallas_kernels.flash_attention import default_interpret

_LOG2E = math.log2(math.e)


class _Rows(NamedTuple):
    """The per-query-row inputs of both kernels, padded to ``Tq_p`` rows.

    q, d_out: ``[Tq_p, Hq, D]`` in ``q.dtype``; lse2: ``[Hq, Tq_p]`` float32 base-2 LSE (0 on
    dead and padding rows); term: ``[Hq, Tq_p]`` float32 ``d_lse - delta`` (0 on dead and
    padding rows); q_pos, q_seg: ``[Tq_p]`` int32 (padding: ``PAD_SEGMENT``).
    """

    q: jax.Array
    d_out: jax.Array
    lse2: jax.Array
    term: jax.Array
    q_pos: jax.Array
    q_seg: jax.Array


def _query_rows(q, q_pos, q_seg, out, lse, d_out, d_lse, block_q: int) -> _Rows:
    """The :class:`_Rows` of ``q [Tq, Hq, D]``, ``out, d_out [Tq, Hq, D]``, ``lse, d_lse
    [Tq, Hq]``: cotangents of dead rows (``lse = -inf``) zeroed, padded to ``block_q``."""
    dead = lse == -jnp.inf
    d_out = jnp.where(dead[..., None], 0.0, d_out.astype(jnp.float32))
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)
    term = jnp.where(dead, 0.0, d_lse.astype(jnp.float32) - delta)
    lse2 = jnp.where(dead, 0.0, lse.astype(jnp.float32)) * _LOG2E
    qp, q_pos_p, q_seg_p = pad_query_rows(q, q_pos, q_seg, block_q)
    return _Rows(
        q=qp,
        d_out=pad_rows(d_out.astype(q.dtype), block_q, 0),
        lse2=pad_rows(lse2, block_q, 0.0).T,
        term=pad_rows(term, block_q, 0.0).T,
        q_pos=q_pos_p,
        q_seg=q_seg_p,
    )


def _probs_and_dscores(q, k, v, d_out, lse2, term, mask, scale: float):
    """One tile: ``(P, dS)`` ``[bq, bk]`` float32 from ``q, d_out [bq, D]``, ``k, v [bk, D]``,
    ``lse2, term [bq]`` and the visibility ``mask [bq, bk]``; ``dS`` is the gradient of the
    scaled scores ``S = q k^T * scale``."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * (scale * _LOG2E)
    p = jnp.where(mask, jnp.exp2(s - lse2[:, None]), 0.0)
    dp = jnp.dot(d_out, v.T, preferred_element_type=jnp.float32)
    return p, p * (dp + term[:, None])


def _dkdv_kernel(
    q_ref,
    do_ref,
    lse2_ref,
    term_ref,
    q_pos_ref,
    q_seg_ref,
    k_ref,
    v_ref,
    kv_pos_ref,
    kv_seg_ref,
    dk_ref,
    dv_ref,
    *,
    block_q: int,
    n_q: int,
    group: int,
    scale: float,
    window: Optional[int],
):
    """One (key block, KV head): refs ``q, do [Tq_p, G, D]``, ``lse2, term [G, Tq_p]``,
    ``q_pos, q_seg [Tq_p]``, ``k, v [bk, D]``, ``kv_pos, kv_seg [bk]``; writes
    ``dk, dv [bk, D]`` float32."""
    k = k_ref[...]
    v = v_ref[...]
    kv_pos = kv_pos_ref[...]
    kv_seg = kv_seg_ref[...]
    kv_bounds = bounds(kv_pos, kv_seg)

    def visit(i, carry):
        span = pl.ds(i * block_q, block_q)
        mask = visibility_mask(q_pos_ref[span], kv_pos, q_seg_ref[span], kv_seg, window)

        def one_head(g, carry):
            dk, dv = carry
            q = q_ref[span, g, :]
            d_out = do_ref[span, g, :]
            p, ds = _probs_and_dscores(
                q, k, v, d_out, lse2_ref[g, span], term_ref[g, span], mask, scale
            )
            dv = dv + jnp.dot(p.astype(d_out.dtype).T, d_out, preferred_element_type=jnp.float32)
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            return dk, dv

        return lax.fori_loop(0, group, one_head, carry)

    def maybe_visit(i, carry):
        span = pl.ds(i * block_q, block_q)
        seen = may_overlap(bounds(q_pos_ref[span], q_seg_ref[span]), kv_bounds, window)
        return lax.cond(seen, lambda c: visit(i, c), lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, n_q, maybe_visit, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _dq_kernel(
    q_ref,
    do_ref,
    lse2_ref,
    term_ref,
    q_pos_ref,
    q_seg_ref,
    k_ref,
    v_ref,
    kv_pos_ref,
    kv_seg_ref,
    dq_ref,
    *,
    block_k: int,
    n_k: int,
    scale: float,
    window: Optional[int],
):
    """One (query block, query head): refs ``q, do [bq, D]``, ``lse2, term [bq]``,
    ``q_pos, q_seg [bq]``, ``k, v [Tk_p, D]``, ``kv_pos, kv_seg [Tk_p]``; writes
    ``dq [bq, D]`` float32."""
    q = q_ref[...]
    d_out = do_ref[...]
    lse2 = lse2_ref[...]
    term = term_ref[...]
    q_pos = q_pos_ref[...]
    q_seg = q_seg_ref[...]
    q_bounds = bounds(q_pos, q_seg)

    def visit(j, dq):
        span = pl.ds(j * block_k, block_k)
        k = k_ref[span, :]
        mask = visibility_mask(q_pos, kv_pos_ref[span], q_seg, kv_seg_ref[span], window)
        _, ds = _probs_and_dscores(q, k, v_ref[span, :], d_out, lse2, term, mask, scale)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    def maybe_visit(j, dq):
        span = pl.ds(j * block_k, block_k)
        seen = may_overlap(q_bounds, bounds(kv_pos_ref[span], kv_seg_ref[span]), window)
        return lax.cond(seen, lambda c: visit(j, c), lambda c: c, dq)

    dq = lax.fori_loop(0, n_k, maybe_visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq * scale


def _compiler_params(interpret: bool, d: int, num_warps: Optional[int], num_stages: int):
    """Triton launch parameters (``None`` in interpret mode)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages)


@functools.partial(
    jax.jit,
    static_argnames=("block_q", "block_k", "window", "interpret", "num_warps", "num_stages"),
)
def flash_attention_grads(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    out,
    lse,
    d_out,
    d_lse,
    *,
    window: Optional[int] = None,
    block_q: int = 64,
    block_k: int = 64,
    interpret: Optional[bool] = None,
    num_warps: Optional[int] = None,
    num_stages: int = 2,
):
    """Flash-attention gradients through the keys ``k, v`` in two Pallas kernels.

    Args:
      q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]`` with ``Hq % Hkv == 0``.
      q_pos, kv_pos, q_seg, kv_seg: ``[Tq]``, ``[Tk]`` int32 positions and segments.
      out, d_out: ``[Tq, Hq, D]``; lse, d_lse: ``[Tq, Hq]``: the attention result over a
        superset of these keys and its cotangents.
      window: optional sliding window.
      block_q, block_k: tile sizes (powers of two, >= 16 on GPU).
      interpret: run the kernels in the Pallas interpreter (default: unless on a GPU).

    Returns:
      ``(dq [Tq, Hq, D], dk [Tk, Hkv, D], dv [Tk, Hkv, D])`` float32.
    """
    check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    if interpret is None:
        interpret = default_interpret()
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    scale = 1.0 / math.sqrt(d)
    rows = _query_rows(q, q_pos, q_seg, out, lse, d_out, d_lse, block_q)
    kp, vp, kv_pos_p, kv_seg_p = pad_kv_rows(k, v, kv_pos, kv_seg, block_k)
    tq_p, tk_p = rows.q.shape[0], kp.shape[0]
    inputs = (*rows, kp, vp, kv_pos_p, kv_seg_p)
    compiler_params = _compiler_params(interpret, d, num_warps, num_stages)

    dkdv = functools.partial(
        _dkdv_kernel, block_q=block_q, n_q=tq_p // block_q, group=group, scale=scale, window=window
    )
    dk, dv = pl.pallas_call(
        dkdv,
        grid=(tk_p // block_k, hkv),
        in_specs=[
            pl.BlockSpec((tq_p, group, d), lambda j, h: (0, h, 0)),
            pl.BlockSpec((tq_p, group, d), lambda j, h: (0, h, 0)),
            pl.BlockSpec((group, tq_p), lambda j, h: (h, 0)),
            pl.BlockSpec((group, tq_p), lambda j, h: (h, 0)),
            pl.BlockSpec((tq_p,), lambda j, h: (0,)),
            pl.BlockSpec((tq_p,), lambda j, h: (0,)),
            pl.BlockSpec((block_k, None, d), lambda j, h: (j, h, 0)),
            pl.BlockSpec((block_k, None, d), lambda j, h: (j, h, 0)),
            pl.BlockSpec((block_k,), lambda j, h: (j,)),
            pl.BlockSpec((block_k,), lambda j, h: (j,)),
        ],
        out_specs=[pl.BlockSpec((block_k, None, d), lambda j, h: (j, h, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((tk_p, hkv, d), jnp.float32)] * 2,
        compiler_params=compiler_params,
        interpret=interpret,
        name="cpjax_flash_attention_dkdv",
    )(*inputs)

    dq_kernel = functools.partial(
        _dq_kernel, block_k=block_k, n_k=tk_p // block_k, scale=scale, window=window
    )
    dq = pl.pallas_call(
        dq_kernel,
        grid=(tq_p // block_q, hq),
        in_specs=[
            pl.BlockSpec((block_q, None, d), lambda i, h: (i, h, 0)),
            pl.BlockSpec((block_q, None, d), lambda i, h: (i, h, 0)),
            pl.BlockSpec((None, block_q), lambda i, h: (h, i)),
            pl.BlockSpec((None, block_q), lambda i, h: (h, i)),
            pl.BlockSpec((block_q,), lambda i, h: (i,)),
            pl.BlockSpec((block_q,), lambda i, h: (i,)),
            pl.BlockSpec((tk_p, None, d), lambda i, h: (0, h // group, 0)),
            pl.BlockSpec((tk_p, None, d), lambda i, h: (0, h // group, 0)),
            pl.BlockSpec((tk_p,), lambda i, h: (0,)),
            pl.BlockSpec((tk_p,), lambda i, h: (0,)),
        ],
        out_specs=pl.BlockSpec((block_q, None, d), lambda i, h: (i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((tq_p, hq, d), jnp.float32),
        compiler_params=compiler_params,
        interpret=interpret,
        name="cpjax_flash_attention_dq",
    )(*inputs)
    return dq[:tq], dk[:tk], dv[:tk]
