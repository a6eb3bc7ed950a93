"""Gradients of the blockwise ``attend`` (its ``custom_vjp``) against autodiff of the reference.

The loss weighs both results, ``out`` and ``lse`` (the ring merges differentiate through the
``lse`` of each partial), so a backward that drops the ``d_lse`` term fails. Rows that see no
key have a constant ``lse = -inf``: the loss leaves them out of its ``lse`` term, and the
backward must ignore whatever cotangent they get.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpjax.attention import blockwise, reference
from tests.test_attention import CASES, _random_qkv, case_inputs


def _weights(shape_out, shape_lse, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(shape_out).astype(np.float32),
        rng.standard_normal(shape_lse).astype(np.float32),
    )


def attention_loss(attend, w_out, w_lse):
    """``loss(q, k, v, *layout)``: a random linear form of ``out`` and of the finite ``lse``."""

    def loss(q, k, v, *layout):
        out, lse = attend(q, k, v, *layout)
        lse_term = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse_term)

    return loss


def qkv_grads(attend, q, k, v, layout, seed=0):
    """``(dq, dk, dv)`` of :func:`attention_loss` of ``attend``, as float32 numpy arrays."""
    w_out, w_lse = _weights(q.shape, q.shape[:2], seed)
    grads = jax.jit(jax.grad(attention_loss(attend, w_out, w_lse), argnums=(0, 1, 2)))(
        q, k, v, *layout
    )
    return [np.asarray(g, np.float32) for g in grads]


def assert_grads_close(got, want, atol=1e-5):
    """Gradients (``dq, dk, dv``, then any others) free of NaN and close to ``want``."""
    assert len(got) == len(want)
    for name, g, w in zip(["dq", "dk", "dv", *range(3, len(got))], got, want):
        assert not np.isnan(g).any(), f"{name} has NaN"
        np.testing.assert_allclose(g, w, atol=atol, rtol=atol, err_msg=f"{name}")


def _window_inputs(tq=45, tk=70, hq=6, hkv=2, d=16, seed=5):
    """Queries the last ``tq`` of ``tk`` tokens, two packed sequences, a padding key."""
    rng = np.random.default_rng(seed)
    q, k, v = _random_qkv(rng, tq, tk, hq, hkv, d)
    kv_pos = np.concatenate([np.arange(40), np.arange(tk - 40)]).astype(np.int32)
    kv_seg = np.repeat([0, 1], [40, tk - 40]).astype(np.int32)
    kv_seg[3] = -1
    return q, k, v, [kv_pos[tk - tq :], kv_pos, kv_seg[tk - tq :], kv_seg]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("blocks", [(8, 5), (16, 16), (512, 512)], ids=str)
def test_blockwise_grad_equals_reference_autodiff(name, blocks):
    """Causal MHA/GQA, queries after a prefix, packed segments in shuffled order, padding and
    queries that see nothing, key blocks all in the future or all in the past; blocks that do
    not divide the lengths, and one block covering everything."""
    q, k, v, layout = case_inputs(name)
    got = qkv_grads(
        lambda *a: blockwise.attend(*a, block_q=blocks[0], block_k=blocks[1]), q, k, v, layout
    )
    assert_grads_close(got, qkv_grads(reference.attend, q, k, v, layout))


@pytest.mark.parametrize("window", [1, 7, 20])
@pytest.mark.parametrize("blocks", [(16, 32), (8, 8)], ids=str)
def test_blockwise_grad_with_sliding_window(window, blocks):
    q, k, v, layout = _window_inputs()
    block_q, block_k = blocks
    got = qkv_grads(
        lambda *a: blockwise.attend(*a, window=window, block_q=block_q, block_k=block_k),
        q,
        k,
        v,
        layout,
    )
    want = qkv_grads(lambda *a: reference.attend(*a, window=window), q, k, v, layout)
    assert_grads_close(got, want)


@pytest.mark.parametrize("part", ["out", "lse"])
def test_each_result_alone_has_the_reference_grad(part):
    """The cotangent of ``out`` alone and of ``lse`` alone (``d_lse`` enters the backward as
    its own term: ``dS = P * (dP - delta) + P * d_lse``)."""
    q, k, v, layout = case_inputs("causal_gqa3")
    pick = 0 if part == "out" else 1

    def loss(attend):
        return lambda *a: jnp.sum(jnp.sin(attend(*a)[pick]))

    blocked = lambda *a: blockwise.attend(*a, block_q=16, block_k=8)  # noqa: E731
    got = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v, *layout)
    want = jax.grad(loss(reference.attend), argnums=(0, 1, 2))(q, k, v, *layout)
    assert_grads_close([np.asarray(g) for g in got], [np.asarray(w) for w in want])


@pytest.mark.parametrize("dead_cotangent", [1.0, np.nan], ids=["ones", "nan"])
def test_rows_that_see_nothing_ignore_their_cotangents(dead_cotangent):
    """Cotangents of ones on the rows that see keys and of ``dead_cotangent`` on the rows with
    ``lse = -inf`` (padding queries, a segment without keys; their ``(out, lse)`` is constant):
    finite gradients, 0 for those queries, equal to the reference's gradients with those
    rows' cotangents zeroed."""
    q, k, v, layout = case_inputs("padding_and_blind_queries")
    blocked = lambda q, k, v: blockwise.attend(q, k, v, *layout, block_q=8, block_k=8)  # noqa: E731
    (out, lse), vjp = jax.vjp(blocked, q, k, v)
    dead = np.isneginf(np.asarray(lse))
    assert dead.all(axis=1).sum() == 10
    d_lse = np.where(dead, dead_cotangent, 1.0).astype(np.float32)
    d_out = np.broadcast_to(d_lse[..., None], out.shape)
    dq, dk, dv = (np.asarray(g) for g in vjp((d_out, d_lse)))
    assert (dq[dead] == 0).all()
    _, want_vjp = jax.vjp(lambda q, k, v: reference.attend(q, k, v, *layout), q, k, v)
    live = np.float32(~dead)
    want = want_vjp((np.broadcast_to(live[..., None], out.shape), live))
    assert_grads_close([dq, dk, dv], [np.asarray(w) for w in want])


def test_positions_and_segments_get_float0_cotangents():
    q, k, v, layout = case_inputs("gqa8_packed")
    (out, lse), vjp = jax.vjp(
        lambda *a: blockwise.attend(*a, block_q=16, block_k=16), q, k, v, *layout
    )
    cotangents = vjp((jnp.ones_like(out), jnp.zeros_like(lse)))
    assert [c.dtype for c in cotangents[3:]] == [jax.dtypes.float0] * 4


# ---------------------------------------------------------------------------- memory
LONG, LONG_BLOCK = 2048, 128


def _jaxpr_shapes(jaxpr):
    """Shapes of every intermediate of ``jaxpr`` and of the jaxprs nested in its equations
    (loop bodies, switch branches, custom-VJP rules)."""
    for eqn in jaxpr.eqns:
        yield from (var.aval.shape for var in eqn.outvars if hasattr(var.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _jaxpr_shapes(sub)


def _hlo_shapes(text: str):
    """Shapes of the arrays in HLO text (``f32[4,2048,16]{...}`` -> ``(4, 2048, 16)``)."""
    for dims in re.findall(r"\b(?:pred|[fsu]\d+|bf16)\[([\d,]+)\]", text):
        yield tuple(int(x) for x in dims.split(","))


def _quadratic(shapes, tq, tk):
    """The shapes with two dimensions ``>= tq`` and ``>= tk`` (a ``[Tq, Tk]``-sized buffer)."""
    found = set()
    for shape in shapes:
        big = sorted((s for s in shape if s >= min(tq, tk)), reverse=True)
        if len(big) >= 2 and big[0] >= max(tq, tk):
            found.add(shape)
    return found


def _long_grad(attend):
    q, k, v = _random_qkv(np.random.default_rng(0), LONG, LONG, 4, 2, 16)
    pos, seg = np.arange(LONG, dtype=np.int32), np.zeros(LONG, np.int32)
    w_out, w_lse = _weights(q.shape, q.shape[:2])
    grad = jax.grad(attention_loss(attend, w_out, w_lse), argnums=(0, 1, 2))
    return grad, (q, k, v, pos, pos, seg, seg)


def test_grad_never_holds_a_tq_by_tk_buffer():
    """T = 2048, blocks of 128: no intermediate of the gradient's jaxpr (forward, backward, every
    loop body and branch) nor of its compiled HLO has two dimensions >= T; the same check finds
    the reference's ``[Hkv, G, T, T]`` scores."""
    blocked = lambda *a: blockwise.attend(*a, block_q=LONG_BLOCK, block_k=LONG_BLOCK)  # noqa: E731
    grad, args = _long_grad(blocked)
    assert not _quadratic(_jaxpr_shapes(jax.make_jaxpr(grad)(*args).jaxpr), LONG, LONG)
    compiled = jax.jit(grad).lower(*args).compile()
    shapes = list(_hlo_shapes(compiled.as_text()))
    assert (LONG, 4, 16) in shapes and not _quadratic(shapes, LONG, LONG)
    assert compiled.memory_analysis().temp_size_in_bytes < LONG * LONG * 4  # one fp32 [T, T]

    grad, args = _long_grad(reference.attend)
    assert (2, 2, LONG, LONG) in _quadratic(
        _jaxpr_shapes(jax.make_jaxpr(grad)(*args).jaxpr), LONG, LONG
    )


def test_bf16_grads_keep_the_input_dtypes_and_are_close():
    q, k, v, layout = case_inputs("causal_gqa3")
    low = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    got = jax.grad(
        attention_loss(
            lambda *a: blockwise.attend(*a, block_q=16, block_k=16), *_weights(q.shape, q.shape[:2])
        ),
        argnums=(0, 1, 2),
    )(*low, *layout)
    assert [g.dtype for g in got] == [jnp.bfloat16] * 3
    want = qkv_grads(reference.attend, *(np.asarray(x, np.float32) for x in low), layout)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=5e-2, rtol=5e-2)
