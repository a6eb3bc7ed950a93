"""Functional Flax (Linen) Llama: embedding, RMSNorm, RoPE from explicit positions, GQA, SwiGLU.

The model works on one *packed row* of tokens ``[T]``: several sequences may share the row,
told apart by segment ids, and every token carries its global position. Attention is an
injected *plan* ``attention(q, k, v, positions, segments, past) -> (out, lse)``: the new
tokens' queries against their own keys/values and, if given, a ``past`` (one layer's cached
``(k, v, pos, seg)``). ``cpjax.attention.with_past(attend)`` makes the single-device plan from
any ``attend`` (DESIGN.md); the context-parallel plans (rings, cross-rank decode) live in
``cpjax.parallel``. So the same model runs single-device, under a ring, or with a Pallas kernel.

Parameters are a plain pytree (``{'params': ...}`` for ``apply``) with layers stacked on a
leading axis (``nn.scan``)::

    embed [V, D]; final_norm [D]; lm_head [D, V] (untied models only)
    layers: attn_norm [L, D], wq [L, D, Hq, Dh], wk/wv [L, D, Hkv, Dh], wo [L, Hq, Dh, D],
            mlp_norm [L, D], w_gate/w_up [L, D, F], w_down [L, F, D]

With ``tensor_axis`` set (inside ``shard_map``), head and FFN dimensions are the local shards
(``Hq / tensor_size`` ...) and the two row-parallel projections are summed over that axis.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpjax.attention import reference, with_past
from cpjax.config import ModelConfig, RopeScaling
from cpjax.errors import require


#: Logical axis names of every parameter (mapped to mesh axes by ``cpjax.parallel.sharding``).
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "layers": {
        "attn_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "q_heads", "head_dim"),
        "wk": ("layers", "embed", "kv_heads", "head_dim"),
        "wv": ("layers", "embed", "kv_heads", "head_dim"),
        "wo": ("layers", "q_heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "embed"),
        "w_gate": ("layers", "embed", "ffn"),
        "w_up": ("layers", "embed", "ffn"),
        "w_down": ("layers", "ffn", "embed"),
    },
}
#: Logical axes of the per-layer keys/values a forward pass returns (``Output.k``/``Output.v``).
KV_AXES = ("layers", "sequence", "kv_heads", "head_dim")


class PastKV(NamedTuple):
    """Keys/values that new tokens attend to in addition to themselves (e.g. a KV cache).

    k, v: ``[L, Tp, Hkv, Dh]``; pos, seg: ``[Tp]`` int32 (segment < 0 marks an empty slot).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    seg: jax.Array


class Output(NamedTuple):
    """What a forward pass returns.

    hidden: ``[T, D]`` final-normed hidden states (feed them to ``Llama.logits``).
    k, v: ``[L, T, Hkv, Dh]`` the new tokens' keys (after RoPE) and values, for a KV cache.
    """

    hidden: jax.Array
    k: jax.Array
    v: jax.Array


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> jax.Array:
    """``[Dh/2]`` float32 inverse frequencies, with Llama-3.1 scaling when ``scaling`` is set."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotate ``x [T, H, Dh]`` by ``positions [T]`` (HF "rotate_half" pairing i <-> i + Dh/2)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, Dh/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last axis in float32, returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(x.dtype)


_init_weight = nn.initializers.normal(stddev=0.02)


class Block(nn.Module):
    """One pre-norm transformer block. Called by ``nn.scan`` over the stacked layers."""

    config: ModelConfig
    attention: Callable
    dtype: Any = jnp.float32
    tensor_axis: Optional[str] = None
    tensor_size: int = 1

    @nn.compact
    def __call__(self, x, context, past):
        """``x [T, D]``; context = (positions, segments, past_pos, past_seg); past = (k, v) | None.

        Returns ``(x, (k_new, v_new))`` with ``k_new, v_new [T, Hkv_local, Dh]``.
        """
        cfg = self.config
        positions, segments, past_pos, past_seg = context
        tp = self.tensor_size
        hq, hkv, dh, f, d = cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.head_dim, \
            cfg.ffn_dim // tp, cfg.dim
        param = lambda name, init, shape: self.param(name, init, shape, self.dtype)  # noqa: E731

        h = rms_norm(x, param("attn_norm", nn.initializers.ones, (d,)), cfg.norm_eps)
        q = jnp.einsum("td,dhk->thk", h, param("wq", _init_weight, (d, hq, dh)))
        k = jnp.einsum("td,dhk->thk", h, param("wk", _init_weight, (d, hkv, dh)))
        v = jnp.einsum("td,dhk->thk", h, param("wv", _init_weight, (d, hkv, dh)))
        inv_freq = rope_inv_freq(dh, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, positions, inv_freq).astype(self.dtype)
        k = apply_rope(k, positions, inv_freq).astype(self.dtype)

        layer_past = None if past is None else (past[0], past[1], past_pos, past_seg)
        out, _ = self.attention(q, k, v, positions, segments, layer_past)
        attn = jnp.einsum("thk,hkd->td", out.astype(self.dtype),
                          param("wo", _init_weight, (hq, dh, d)))
        x = x + self._tensor_sum(attn)
        self.sow("intermediates", "after_attention", x)   # kept only when asked (diagnostics)

        h = rms_norm(x, param("mlp_norm", nn.initializers.ones, (d,)), cfg.norm_eps)
        gate = h @ param("w_gate", _init_weight, (d, f))
        up = h @ param("w_up", _init_weight, (d, f))
        mlp = (jax.nn.silu(gate) * up) @ param("w_down", _init_weight, (f, d))
        x = x + self._tensor_sum(mlp)
        return x, (k, v)

    def _tensor_sum(self, partial):
        """Sum a row-parallel projection over the tensor axis (identity without one)."""
        if self.tensor_axis is None:
            return partial
        return jax.lax.psum(partial, self.tensor_axis)


class Llama(nn.Module):
    """Decoder-only Llama over one packed row of tokens.

    Attributes:
      config: shapes and numerics.
      attention: the attention plan (see module docstring).
      dtype: parameter and activation dtype (float32 or bfloat16); norms, RoPE, softmax
        statistics and logits are float32.
      tensor_axis, tensor_size: mesh axis and size for tensor parallelism (None, 1 = off).
    """

    config: ModelConfig
    attention: Callable
    dtype: Any = jnp.float32
    tensor_axis: Optional[str] = None
    tensor_size: int = 1

    def setup(self):
        cfg = self.config
        self.embed = self.param("embed", _init_weight, (cfg.vocab_size, cfg.dim), self.dtype)
        self.final_norm = self.param("final_norm", nn.initializers.ones, (cfg.dim,), self.dtype)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", _init_weight, (cfg.dim, cfg.vocab_size),
                                      self.dtype)
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, 0), out_axes=0, length=cfg.n_layers)
        self.layers = scanned(cfg, self.attention, self.dtype, self.tensor_axis, self.tensor_size)

    def __call__(self, tokens, positions, segments, past: Optional[PastKV] = None) -> Output:
        """Run the trunk.

        Args:
          tokens, positions, segments: ``[T]`` int32 (segment < 0 marks a padding token).
          past: optional earlier keys/values every new token may also attend to.

        Returns:
          :class:`Output` (final-normed hidden states and the new tokens' K/V per layer).
        """
        x = jnp.take(self.embed, tokens, axis=0)
        if past is None:
            empty = jnp.zeros((0,), jnp.int32)
            context, layer_past = (positions, segments, empty, empty), None
        else:
            context, layer_past = (positions, segments, past.pos, past.seg), (past.k, past.v)
        x, (k, v) = self.layers(x, context, layer_past)
        hidden = rms_norm(x, self.final_norm, self.config.norm_eps)
        return Output(hidden=hidden, k=k, v=v)

    def logits(self, hidden):
        """``[..., D]`` hidden states to ``[..., V]`` float32 logits."""
        if self.config.tie_embeddings:   # contract with the [V, D] table as stored
            return jnp.einsum("...d,vd->...v", hidden, self.embed,
                              preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", hidden, self.lm_head,
                          preferred_element_type=jnp.float32)


def init_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Random parameters (normal std 0.02, unit norms) as a plain pytree without ``'params'``."""
    model = Llama(config, attention=with_past(reference.attend), dtype=dtype)
    tokens = jnp.zeros((1,), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(seed), tokens, tokens, tokens)
    return variables["params"]


def param_shapes(config: ModelConfig, dtype=jnp.float32):
    """The parameter pytree's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), no compute."""
    return jax.eval_shape(lambda: init_params(config, 0, dtype))


def leaf_name(path) -> str:
    """``"layers/wq"`` for the pytree path of ``params["layers"]["wq"]``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaves_by_name(tree) -> dict:
    """``{"layers/wq": leaf, ...}``: the leaves of a nested-dict pytree by name."""
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_param_shapes(config: ModelConfig, shapes: dict, what: str = "params") -> None:
    """Raise a :class:`CpjaxError` unless ``shapes`` (``{leaf name: shape}``) has exactly the
    leaves and shapes that ``config`` implies (:func:`param_shapes`), naming every mismatch."""
    expected = {name: tuple(x.shape) for name, x in leaves_by_name(param_shapes(config)).items()}
    got = {name: tuple(shape) for name, shape in shapes.items()}
    problems = ([f"{n} is missing" for n in expected if n not in got]
                + [f"{n} is not a parameter of this model" for n in got if n not in expected]
                + [f"{n} has shape {got[n]}, the config needs {s}"
                   for n, s in expected.items() if n in got and got[n] != s])
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3
                                       else "")
    require(not problems, f"{what} do not match model config {config.name!r}: {shown}")
