"""Blockwise ``attend`` in plain XLA: online softmax over key blocks, masked blocks skipped.

Same contract as ``reference.attend`` but never materialises the ``[Tq, Tk]`` scores: queries are
cut into blocks of ``block_q`` rows, keys into blocks of ``block_k``; for each query block a loop
over key blocks keeps float32 running statistics (max, sum, weighted values). A key block that the
per-block bounds of positions and segment ids prove invisible to the whole query block is skipped
with ``lax.cond``, so causal attention costs about half of full attention, and a ring step against
a block that lies entirely in the future costs almost nothing. This is the fast path on CPU, and
the portable fallback everywhere.

It is differentiable (``jax.custom_vjp``) with a flash-style backward that recomputes the
probabilities block by block from ``(q, k, v, out, lse)`` with the same masks and the same block
skipping, so neither pass holds a ``[Tq, Tk]`` buffer. The backward takes the cotangent of
``lse`` as well as of ``out`` (the ring merges weigh partials by their ``lse``)::

    P = exp(S - lse)    dP = dO V^T    delta = rowsum(dO * O)
    dS = P * (dP - delta + d_lse)    dQ = dS K / sqrt(D)    dK = dS^T Q / sqrt(D)    dV = P^T dO

summed over the ``G`` query heads of each KV head for ``dK``, ``dV``. Rows that see no key have
a constant ``(out, lse) = (0, -inf)``: their cotangents are ignored (no NaN).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpjax.attention.layer_view import READS_LAYER_VIEWS, LayerView
from cpjax.attention.masks import (
    PAD_SEGMENT,
    BlockBounds,
    block_bounds,
    bounds,
    check_attend_inputs,
    fully_visible,
    may_overlap,
    visibility_mask,
)
from cpjax.attention.padding import pad_kv_rows, pad_query_rows, pad_rows

#: Default blocks: large enough to amortise the loop on CPU, multiples of the 64-row tile.
BLOCK_Q = 256
BLOCK_K = 512
#: The smallest half key block the forward attends to alone (see ``_forward``).
MIN_HALF_BLOCK = 64
#: Key blocks of the backward (:func:`attend_grads`): it holds three ``block_q x block_k``
#: tiles per head group (``P``, ``dP``, ``dS``) where the forward holds one, so it takes half
#: the forward's keys. At 8K tokens on 8 ranks (tiny model, pass-KV) this cuts a train step's
#: temporary memory per device from 15.3 to 13.9 MB, and the step is no slower
#: (``experiments/finetune.py``).
GRAD_BLOCK_K = 256


def block_sizes(tq: int, tk: int, block_q: int, block_k: int) -> tuple[int, int]:
    """The blocks :func:`attend` uses for ``Tq`` queries and ``Tk`` keys: the requested sizes
    clipped to the lengths (one block covers a short input)."""
    return min(block_q, max(tq, 1)), min(block_k, max(tk, 1))


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
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
):
    """Masked GQA attention by blocks; see ``reference.attend`` for shapes and semantics.

    Args:
      q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]``, arrays or
        :class:`~cpjax.attention.layer_view.LayerView` s of a layer-stacked KV cache (read block
        by block in place, never copied whole; not differentiable); positions and segments
        ``[Tq]`` / ``[Tk]`` int32.
      window: optional sliding window.
      block_q, block_k: block sizes (any >= 1; clipped to the lengths, see
        :func:`block_sizes`).

    Returns:
      ``(out [Tq, Hq, D] in q.dtype, lse [Tq, Hq] float32)``.
    """
    check_attend_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    block_q, block_k = block_sizes(q.shape[0], k.shape[0], block_q, block_k)
    if isinstance(k, LayerView) or isinstance(v, LayerView):  # a KV cache: inference only
        return _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k)
    return _attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k)


setattr(attend, READS_LAYER_VIEWS, True)


def _rows_to_blocks(x, block: int, hkv: int, group: int):
    """``x [n * block, Hkv * group, ...]`` to the GEMM-friendly ``[n, Hkv, group * block, ...]``:
    row ``r = g * block + t`` of block ``i`` is row ``i * block + t``, head ``h * group + g``."""
    t, _, *rest = x.shape
    x = x.reshape(t // block, block, hkv, group, *rest)
    return jnp.moveaxis(x, 1, 3).reshape(t // block, hkv, group * block, *rest)


def _blocks_to_rows(x, block: int, hkv: int, group: int):
    """The inverse of :func:`_rows_to_blocks`: ``[n, Hkv, group * block, ...]`` to
    ``[n * block, Hkv * group, ...]``."""
    n, _, _, *rest = x.shape
    x = jnp.moveaxis(x.reshape(n, hkv, group, block, *rest), 3, 1)
    return x.reshape(n * block, hkv * group, *rest)


def _key_blocks(k, v, kv_pos, kv_seg, block_k: int):
    """The keys/values cut into ``n_k`` blocks of ``block_k`` rows (``block_k <= Tk``).

    Returns ``(read, kv_pos_blocks [n_k, bk], kv_seg_blocks [n_k, bk])`` where ``read(j)``
    gives block ``j`` as ``(k_j, v_j)`` ``[Hkv, bk, D]``. Arrays are padded and laid out as
    blocks once. A :class:`LayerView` is read in place, one dynamic slice per visited block: no
    padding (the last block is the last ``bk`` rows, its rows already read by the block before
    marked ``PAD_SEGMENT``), so a step reads only the blocks it attends.
    """
    tk, hkv, _ = k.shape
    if not isinstance(k, LayerView) and not isinstance(v, LayerView):
        kp, vp, kv_pos_p, kv_seg_p = pad_kv_rows(k, v, kv_pos, kv_seg, block_k)
        n_k = kp.shape[0] // block_k
        k_blocks = _rows_to_blocks(kp, block_k, hkv, 1)  # [n_k, Hkv, bk, D]
        v_blocks = _rows_to_blocks(vp, block_k, hkv, 1)

        def read_blocks(j):
            return k_blocks[j], v_blocks[j]

        return read_blocks, kv_pos_p.reshape(n_k, block_k), kv_seg_p.reshape(n_k, block_k)
    n_k = -(-tk // block_k)
    first = np.arange(n_k) * block_k
    starts = np.minimum(first, tk - block_k)
    rows = starts[:, None] + np.arange(block_k)  # [n_k, bk] static row indices
    kv_pos_blocks = jnp.asarray(kv_pos, jnp.int32)[rows]
    kv_seg_blocks = jnp.where(
        rows < first[:, None], PAD_SEGMENT, jnp.asarray(kv_seg, jnp.int32)[rows]
    )

    def read(j):
        start = jnp.asarray(starts, jnp.int32)[j]
        return tuple(jnp.swapaxes(_rows(x, start, block_k), 0, 1) for x in (k, v))

    return read, kv_pos_blocks, kv_seg_blocks


def _rows(x, start, size: int):
    """Rows ``[start, start + size)`` of an array or a :class:`LayerView`."""
    if isinstance(x, LayerView):
        return x.rows(start, size)
    return jax.lax.dynamic_slice_in_dim(x, start, size)


def _skip_branch(q_bounds: BlockBounds, kv_bounds: BlockBounds, window: Optional[int]):
    """Which ``lax.switch`` branch a (query block, key block) pair takes: 0 skip (invisible),
    1 masked, 2 unmasked (every query sees every key)."""
    visible = may_overlap(q_bounds, kv_bounds, window)
    full = fully_visible(q_bounds, kv_bounds, window)
    return jnp.where(visible, jnp.where(full, 2, 1), 0)


def _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k):
    """The online-softmax forward of :func:`attend` (``block_q <= Tq``, ``block_k <= Tk``)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    scale = 1.0 / float(d) ** 0.5

    qp, q_pos_p, q_seg_p = pad_query_rows(q, q_pos, q_seg, block_q)
    n_q = qp.shape[0] // block_q

    # GEMM-friendly layouts: [block, Hkv, G*bq | bk, D]; row r of a query block is (g, q).
    q_blocks = _rows_to_blocks(qp, block_q, hkv, group)
    read_kv, kv_pos_blocks, kv_seg_blocks = _key_blocks(k, v, kv_pos, kv_seg, block_k)
    n_k = kv_pos_blocks.shape[0]
    q_bounds = block_bounds(q_pos_p, q_seg_p, block_q)
    kv_bounds = bounds(kv_pos_blocks, kv_seg_blocks)
    # On the causal diagonal a query block often sees only the first half of a key block:
    # those pairs attend to that half alone (the blocks visited cover 56 % of a causal score
    # matrix instead of 62.5 % with 256 x 512 blocks).
    half = block_k // 2
    second_half_bounds = (
        bounds(kv_pos_blocks[:, half:], kv_seg_blocks[:, half:])
        if block_k % 2 == 0 and half >= MIN_HALF_BLOCK
        else None
    )

    def one_query_block(i):
        qb = q_blocks[i].astype(jnp.float32) * scale  # [Hkv, G*bq, D]
        qb_pos = jax.lax.dynamic_slice_in_dim(q_pos_p, i * block_q, block_q)
        qb_seg = jax.lax.dynamic_slice_in_dim(q_seg_p, i * block_q, block_q)
        qb_bounds = BlockBounds(*(b[i] for b in q_bounds))

        def update(j, carry, masked: bool, keys: slice = slice(None)):
            m, l, acc = carry  # [Hkv, G*bq] x2, [.., D]
            kb, vb = (x[:, keys] for x in read_kv(j))
            s = jnp.einsum("hrd,hkd->hrk", qb, kb.astype(jnp.float32))
            if masked:
                mask = visibility_mask(
                    qb_pos, kv_pos_blocks[j][keys], qb_seg, kv_seg_blocks[j][keys], window
                )  # [bq, bk]
                s = jnp.where(jnp.tile(mask, (group, 1))[None], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l_new = alpha * l + p.sum(axis=-1)
            acc_new = alpha[..., None] * acc + jnp.einsum("hrk,hkd->hrd", p, vb.astype(jnp.float32))
            return m_new, l_new, acc_new

        def maybe_update(j, carry):
            kvb_bounds = BlockBounds(*(b[j] for b in kv_bounds))
            branch = _skip_branch(qb_bounds, kvb_bounds, window)
            branches = [
                lambda _, c: c,
                functools.partial(update, masked=True),
                functools.partial(update, masked=False),
            ]
            if second_half_bounds is not None:  # a masked block whose second half no query sees
                second_half = BlockBounds(*(b[j] for b in second_half_bounds))
                unseen = ~may_overlap(qb_bounds, second_half, window)
                branch = jnp.where((branch == 1) & unseen, 3, branch)
                branches.append(functools.partial(update, masked=True, keys=slice(0, half)))
            return jax.lax.switch(branch, branches, j, carry)

        rows = group * block_q
        init = (
            jnp.full((hkv, rows), -jnp.inf, jnp.float32),
            jnp.zeros((hkv, rows), jnp.float32),
            jnp.zeros((hkv, rows, d), jnp.float32),
        )
        m, l, acc = jax.lax.fori_loop(0, n_k, maybe_update, init)
        seen = l != 0  # NaN counts as seen: a NaN input must surface, not vanish
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        out = out.reshape(hkv, group, block_q, d).transpose(2, 0, 1, 3).reshape(block_q, hq, d)
        lse = lse.reshape(hkv, group, block_q).transpose(2, 0, 1).reshape(block_q, hq)
        return out, lse

    out, lse = jax.lax.map(one_query_block, jnp.arange(n_q))
    out = out.reshape(n_q * block_q, hq, d)[:tq].astype(q.dtype)
    lse = lse.reshape(n_q * block_q, hq)[:tq]
    return out, lse


def flash_vjp(forward: Callable, grads: Callable, grad_block_k: Optional[int] = None) -> Callable:
    """``forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k) -> (out,
    lse)`` made differentiable with a flash-style backward ``grads`` (the signature of
    :func:`attend_grads`): the VJP keeps only the inputs and ``(out, lse)``, and returns
    ``(dq, dk, dv)`` in the dtypes of ``q, k, v`` (nothing for positions and segments).
    ``window, block_q, block_k`` are static; the backward takes the forward's blocks, its key
    blocks at most ``grad_block_k`` rows when given."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
    def differentiable(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k):
        return forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k)

    def forward_with_residuals(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k):
        out, lse = forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window, block_q, block_k)
        return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)

    def backward(window, block_q, block_k, residuals, cotangents):
        q, k, v = residuals[:3]
        if grad_block_k is not None:
            block_k = min(block_k, grad_block_k)
        dq_dk_dv = grads(*residuals, *cotangents, window=window, block_q=block_q, block_k=block_k)
        cast = tuple(g.astype(x.dtype) for g, x in zip(dq_dk_dv, (q, k, v)))
        return (*cast, None, None, None, None)

    differentiable.defvjp(forward_with_residuals, backward)
    return differentiable


def attend_grads(
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
    block_q: int = BLOCK_Q,
    block_k: int = GRAD_BLOCK_K,
):
    """Flash-style gradients of attention through the keys ``k, v``, by blocks.

    ``(out, lse)`` is the result of attention of ``q`` over a set of keys that contains these
    (all of them: the VJP of :func:`attend`; or the union over the ranks of a ring, whose
    merged result it is) and ``(d_out, d_lse)`` its cotangents. Since ``P = exp(S - lse)``
    with the final ``lse``, the gradients of disjoint key sets add up: this returns this key
    set's part of ``dq`` and its whole ``dk, dv``.

    Args:
      q ``[Tq, Hq, D]``, k, v ``[Tk, Hkv, D]``, positions and segments ``[Tq]`` / ``[Tk]``;
      out ``[Tq, Hq, D]``, lse ``[Tq, Hq]`` and their cotangents d_out, d_lse (same shapes).
      window, block_q, block_k: as for :func:`attend` (blocks clipped by :func:`block_sizes`).

    Returns:
      ``(dq [Tq, Hq, D], dk [Tk, Hkv, D], dv [Tk, Hkv, D])`` float32.

    One scan over key blocks carries the float32 ``dq`` of all queries (``O(Tq)``); for key
    block ``j`` a loop over the query blocks it may see accumulates ``dk_j, dv_j``. The pairs
    skipped (or left unmasked) are those of the forward: the same :func:`_skip_branch`.
    """
    block_q, block_k = block_sizes(q.shape[0], k.shape[0], block_q, block_k)
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    scale = 1.0 / float(d) ** 0.5

    dead = lse == -jnp.inf  # sees no key: (out, lse) = (0, -inf) whatever the inputs
    d_out = jnp.where(dead[..., None], 0.0, d_out.astype(jnp.float32))
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)
    row_term = jnp.where(dead, 0.0, d_lse.astype(jnp.float32) - delta)  # [Tq, Hq]
    live_lse = jnp.where(dead, 0.0, lse)  # dead rows are masked in every block they visit

    qp, q_pos_p, q_seg_p = pad_query_rows(q, q_pos, q_seg, block_q)
    kp, vp, kv_pos_p, kv_seg_p = pad_kv_rows(k, v, kv_pos, kv_seg, block_k)
    n_q, n_k = qp.shape[0] // block_q, kp.shape[0] // block_k
    as_q_blocks = functools.partial(_rows_to_blocks, block=block_q, hkv=hkv, group=group)
    q_blocks = as_q_blocks(qp.astype(jnp.float32) * scale)  # [n_q, Hkv, G*bq, D]
    do_blocks = as_q_blocks(pad_rows(d_out, block_q, 0.0))
    lse_blocks = as_q_blocks(pad_rows(live_lse, block_q, 0.0))  # [n_q, Hkv, G*bq]
    term_blocks = as_q_blocks(pad_rows(row_term, block_q, 0.0))
    k_blocks = _rows_to_blocks(kp, block_k, hkv, 1)  # [n_k, Hkv, bk, D]
    v_blocks = _rows_to_blocks(vp, block_k, hkv, 1)
    q_pos_blocks, q_seg_blocks = q_pos_p.reshape(n_q, block_q), q_seg_p.reshape(n_q, block_q)
    kv_pos_blocks, kv_seg_blocks = kv_pos_p.reshape(n_k, block_k), kv_seg_p.reshape(n_k, block_k)
    q_bounds = block_bounds(q_pos_p, q_seg_p, block_q)
    kv_bounds = block_bounds(kv_pos_p, kv_seg_p, block_k)

    def one_key_block(dq, j):
        kb = k_blocks[j].astype(jnp.float32)  # [Hkv, bk, D]
        vb = v_blocks[j].astype(jnp.float32)
        kvb_bounds = BlockBounds(*(b[j] for b in kv_bounds))

        def update(i, carry, masked: bool):
            dq, dk, dv = carry  # [n_q, Hkv, G*bq, D], [Hkv, bk, D] x2
            qb, dob = q_blocks[i], do_blocks[i]
            p = jnp.exp(jnp.einsum("hrd,hkd->hrk", qb, kb) - lse_blocks[i][..., None])
            if masked:
                mask = visibility_mask(
                    q_pos_blocks[i], kv_pos_blocks[j], q_seg_blocks[i], kv_seg_blocks[j], window
                )  # [bq, bk]
                p = jnp.where(jnp.tile(mask, (group, 1))[None], p, 0.0)
            dp = jnp.einsum("hrd,hkd->hrk", dob, vb)
            ds = p * (dp + term_blocks[i][..., None])  # [Hkv, G*bq, bk]
            dq = dq.at[i].add(jnp.einsum("hrk,hkd->hrd", ds, kb) * scale)
            dk = dk + jnp.einsum("hrk,hrd->hkd", ds, qb)
            dv = dv + jnp.einsum("hrk,hrd->hkd", p, dob)
            return dq, dk, dv

        def maybe_update(i, carry):
            qb_bounds = BlockBounds(*(b[i] for b in q_bounds))
            return jax.lax.switch(
                _skip_branch(qb_bounds, kvb_bounds, window),
                [
                    lambda _, c: c,
                    functools.partial(update, masked=True),
                    functools.partial(update, masked=False),
                ],
                i,
                carry,
            )

        zeros_kv = jnp.zeros((hkv, block_k, d), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, n_q, maybe_update, (dq, zeros_kv, zeros_kv))
        return dq, (dk, dv)

    dq0 = jnp.zeros(q_blocks.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(one_key_block, dq0, jnp.arange(n_k))
    dq = _blocks_to_rows(dq, block_q, hkv, group)[:tq]
    dk = _blocks_to_rows(dk, block_k, hkv, 1)[:tk]
    dv = _blocks_to_rows(dv, block_k, hkv, 1)[:tk]
    return dq, dk, dv


# the differentiable function behind attend
_attend = flash_vjp(_forward, attend_grads, GRAD_BLOCK_K)
