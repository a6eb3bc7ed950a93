"""Exact merge of partial attention results over disjoint key sets (log-sum-exp algebra).

If ``(out_i, lse_i)`` is attention of the same queries over key set ``S_i`` (each ``out_i``
normalised over its own set), attention over ``S_1 ∪ S_2`` is::

    lse = logaddexp(lse_1, lse_2)
    out = exp(lse_1 - lse) * out_1 + exp(lse_2 - lse) * out_2

A side that saw no key has ``lse = -inf`` and weight 0; when both are ``-inf`` the result is
``out = 0, lse = -inf`` (never NaN); a NaN partial stays NaN (it is not mistaken for an empty
one). Accumulation is float32.
"""

from __future__ import annotations

import jax.numpy as jnp


def merge(out_a, lse_a, out_b, lse_b):
    """Merge two partial results.

    Args:
      out_a, out_b: ``[..., Tq, H, D]`` partial outputs.
      lse_a, lse_b: ``[..., Tq, H]`` float32 log-sum-exps (``-inf`` = saw nothing).

    Returns:
      ``(out, lse)`` with ``out`` float32 ``[..., Tq, H, D]`` and ``lse`` float32 ``[..., Tq, H]``.
    """
    lse_a = lse_a.astype(jnp.float32)
    lse_b = lse_b.astype(jnp.float32)
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w_a = jnp.where(lse_a == -jnp.inf, 0.0, jnp.exp(lse_a - safe))[..., None]
    w_b = jnp.where(lse_b == -jnp.inf, 0.0, jnp.exp(lse_b - safe))[..., None]
    out = w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)
    return out, lse


def merge_reduced(out, lse, reduce_max, reduce_sum):
    """Merge partials spread along an axis that ``reduce_max`` / ``reduce_sum`` reduce: an
    array axis (:func:`merge_stacked`) or a mesh axis (``pmax`` / ``psum`` across ranks).

    Args:
      out: ``[..., Tq, H, D]`` partial outputs; lse: ``[..., Tq, H]`` their log-sum-exps.
      reduce_max, reduce_sum: reductions over the partials' axis (broadcastable results).

    Returns ``(out, lse)`` float32 over the union; rows no partial saw get 0 / -inf.
    """
    lse = lse.astype(jnp.float32)
    top = reduce_max(lse)
    safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - safe_top))  # a NaN stays NaN
    total = reduce_sum(weight)
    summed = reduce_sum(weight[..., None] * out.astype(jnp.float32))
    seen = total != 0
    out = jnp.where(seen[..., None], summed / jnp.where(seen, total, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, safe_top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    return out, lse


def merge_stacked(outs, lses):
    """Merge ``n`` partials stacked on axis 0: ``outs [n, ..., D]``, ``lses [n, ...]``.

    Returns ``(out [..., D] float32, lse [...] float32)``; rows no partial saw get 0 / -inf.
    """
    return merge_reduced(outs, lses, lambda x: x.max(axis=0), lambda x: x.sum(axis=0))
