"""Functional Flax (Linen) Llama: embedding, RMSNorm, RoPE from explicit positions, GQA, SwiGLU.

The model works on one *packed row* of tokens ``[T]``: several sequences may share the row,
told apart by segment ids, and every token carries its global position. Attention is an
injected *plan* ``attention(q, k, v, positions, segments, past) -> (out, lse)``: the new
tokens' queries against their own keys/values and, if given, a ``past`` (one layer's cached
``(k, v, pos, seg)``). ``cpjax.attention.with_past(attend)`` makes the single-device plan from
any ``attend`` (DESIGN.md); the context-parallel plans (rings, cross-rank decode) live in
``cpjax.parallel``. So the same model runs single-device, under a ring, or with a Pallas kernel.

Parameters are described once, in the table :data:`PARAMS` (shapes, logical axes, initialisers,
HF and GGUF names and layouts); init, shapes, shardings, loaders, export and the parameter count
all derive from it. They form a plain pytree (``{'params': ...}`` for ``apply``) with layers
stacked on a leading axis (``nn.scan``)::

    embed [V, D]; final_norm [D]; lm_head [D, V] (untied models only)
    layers: attn_norm [L, D], wq [L, D, Hq, Dh], wk/wv [L, D, Hkv, Dh], wo [L, Hq, Dh, D],
            mlp_norm [L, D], w_gate/w_up [L, D, F], w_down [L, F, D]

Inside ``shard_map`` (``mesh_axis_sizes`` given), each parameter is the local shard that
``cpjax.parallel.sharding.RULES`` implies, and every projection that contracts a split axis is
``psum``-ed over its mesh axis: editing ``RULES`` alone changes the tensor-parallel layout.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpjax.attention.plans import PastKV
from cpjax.config import ModelConfig, RopeScaling
from cpjax.errors import require
from cpjax.model import params as table
from cpjax.model.params import Param, leaf_name, leaves_by_name
from cpjax.parallel.sharding import MeshAxisSizes, local_shape, split_axes, sum_axes

__all__ = [
    "Block",
    "KV_AXES",
    "Llama",
    "Output",
    "PARAMS",
    "PastKV",
    "apply_rope",
    "check_layout",
    "check_param_shapes",
    "init_params",
    "leaf_name",
    "leaves_by_name",
    "param_axes",
    "param_count",
    "param_shapes",
    "rms_norm",
    "rope_inv_freq",
    "unpermute_rope_rows",
]


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation of an ``[out, in]`` projection (``out = H * Dh``).

    llama.cpp's converter applies ``w.reshape(H, 2, Dh/2, in).swapaxes(1, 2).reshape(out, in)``
    (rotate_half pairs -> adjacent pairs); this is its inverse.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


_normal = jax.nn.initializers.normal(stddev=0.02)
_ones = jax.nn.initializers.ones
_LAYER = "model.layers.{layer}."
_BLK = "blk.{layer}."

#: Every Llama parameter, once. Axes: V vocab, D embed, L layers, Hq q_heads, Hkv kv_heads,
#: Dh head_dim, F ffn. HF weights are ``[out, in]`` (``hf_in_axes`` leading axes are "in").
PARAMS: table.Table = (
    Param(
        "embed",
        lambda c: (c.vocab_size, c.dim),
        ("vocab", "embed"),
        _normal,
        hf="model.embed_tokens.weight",
        gguf="token_embd.weight",
    ),
    Param(
        "final_norm",
        lambda c: (c.dim,),
        ("embed",),
        _ones,
        hf="model.norm.weight",
        gguf="output_norm.weight",
    ),
    Param(
        "lm_head",
        lambda c: (c.dim, c.vocab_size),
        ("embed", "vocab"),
        _normal,
        hf="lm_head.weight",
        gguf="output.weight",
        hf_in_axes=1,
        present=lambda c: not c.tie_embeddings,
    ),
    Param(
        "layers/attn_norm",
        lambda c: (c.n_layers, c.dim),
        ("layers", "embed"),
        _ones,
        hf=_LAYER + "input_layernorm.weight",
        gguf=_BLK + "attn_norm.weight",
    ),
    Param(
        "layers/wq",
        lambda c: (c.n_layers, c.dim, c.n_heads, c.head_dim),
        ("layers", "embed", "q_heads", "head_dim"),
        _normal,
        hf=_LAYER + "self_attn.q_proj.weight",
        gguf=_BLK + "attn_q.weight",
        hf_in_axes=1,
        from_gguf=lambda w, c: unpermute_rope_rows(w, c.n_heads),
    ),
    Param(
        "layers/wk",
        lambda c: (c.n_layers, c.dim, c.n_kv_heads, c.head_dim),
        ("layers", "embed", "kv_heads", "head_dim"),
        _normal,
        hf=_LAYER + "self_attn.k_proj.weight",
        gguf=_BLK + "attn_k.weight",
        hf_in_axes=1,
        from_gguf=lambda w, c: unpermute_rope_rows(w, c.n_kv_heads),
    ),
    Param(
        "layers/wv",
        lambda c: (c.n_layers, c.dim, c.n_kv_heads, c.head_dim),
        ("layers", "embed", "kv_heads", "head_dim"),
        _normal,
        hf=_LAYER + "self_attn.v_proj.weight",
        gguf=_BLK + "attn_v.weight",
        hf_in_axes=1,
    ),
    Param(
        "layers/wo",
        lambda c: (c.n_layers, c.n_heads, c.head_dim, c.dim),
        ("layers", "q_heads", "head_dim", "embed"),
        _normal,
        hf=_LAYER + "self_attn.o_proj.weight",
        gguf=_BLK + "attn_output.weight",
        hf_in_axes=2,
    ),
    Param(
        "layers/mlp_norm",
        lambda c: (c.n_layers, c.dim),
        ("layers", "embed"),
        _ones,
        hf=_LAYER + "post_attention_layernorm.weight",
        gguf=_BLK + "ffn_norm.weight",
    ),
    Param(
        "layers/w_gate",
        lambda c: (c.n_layers, c.dim, c.ffn_dim),
        ("layers", "embed", "ffn"),
        _normal,
        hf=_LAYER + "mlp.gate_proj.weight",
        gguf=_BLK + "ffn_gate.weight",
        hf_in_axes=1,
    ),
    Param(
        "layers/w_up",
        lambda c: (c.n_layers, c.dim, c.ffn_dim),
        ("layers", "embed", "ffn"),
        _normal,
        hf=_LAYER + "mlp.up_proj.weight",
        gguf=_BLK + "ffn_up.weight",
        hf_in_axes=1,
    ),
    Param(
        "layers/w_down",
        lambda c: (c.n_layers, c.ffn_dim, c.dim),
        ("layers", "ffn", "embed"),
        _normal,
        hf=_LAYER + "mlp.down_proj.weight",
        gguf=_BLK + "ffn_down.weight",
        hf_in_axes=1,
    ),
)
_BY_NAME = table.by_name(PARAMS)

#: Logical axes of the per-layer keys/values a forward pass returns (``Output.k``/``Output.v``).
KV_AXES = ("layers", "sequence", "kv_heads", "head_dim")
#: Logical axes the forward keeps whole on every device: the layer scan, the residual stream,
#: RoPE and attention within a head, the embedding lookup and the logits.
WHOLE_AXES = ("layers", "embed", "head_dim", "vocab")


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
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotate ``x [T, H, Dh]`` by ``positions [T]`` (HF "rotate_half" pairing i <-> i + Dh/2)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
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


def check_layout(mesh_axis_sizes: MeshAxisSizes) -> None:
    """Raise a :class:`CpjaxError` unless the sharding RULES give a layout this forward can run
    inside a ``shard_map`` over ``mesh_axis_sizes``: :data:`WHOLE_AXES` unsplit, and query and
    KV heads split alike (each device pairs its query heads with its own KV heads)."""
    for axis in WHOLE_AXES:
        split = split_axes((axis,), mesh_axis_sizes)[0]
        require(
            split is None,
            f"sharding RULES map logical axis {axis!r} to mesh axis {split and split[0]!r} "
            f"of size {split and split[1]}, but the Llama forward keeps {axis!r} whole on "
            f"every device: map it to None",
        )
    q, kv = (split_axes((axis,), mesh_axis_sizes)[0] for axis in ("q_heads", "kv_heads"))
    require(
        q == kv,
        f"sharding RULES split 'q_heads' as {q} but 'kv_heads' as {kv} (mesh axis, size) "
        f"in mesh {dict(mesh_axis_sizes)}: grouped-query attention needs both split over "
        f"the same mesh axis or neither",
    )


def contract(spec: str, x, w, w_axes: tuple, mesh_axis_sizes: MeshAxisSizes, **kwargs):
    """``einsum(spec, x, w)``, ``psum``-ed over the mesh axes that split an axis of ``w`` which
    ``spec`` contracts (``w_axes``: ``w``'s logical axes). Under tensor parallelism that is the
    row-parallel projection's sum; outside ``shard_map`` it is the plain einsum."""
    inputs, out = spec.split("->")
    contracted = tuple(
        axis for letter, axis in zip(inputs.split(",")[1], w_axes) if letter not in out
    )
    y = jnp.einsum(spec, x, w, **kwargs)
    axes = sum_axes(contracted, mesh_axis_sizes)
    return jax.lax.psum(y, axes) if axes else y


def _local_param(module: nn.Module, name: str, dtype, mesh_axis_sizes: MeshAxisSizes):
    """Declare table entry ``name`` on ``module`` with its local shard shape (one layer's slice
    for a stacked entry, which ``nn.scan`` stacks); returns ``(array, its logical axes)``."""
    p = _BY_NAME[name]
    shape = local_shape(name, p.shape(module.config), p.axes, mesh_axis_sizes)
    axes = p.axes
    if p.stacked:
        shape, axes = shape[1:], axes[1:]
    return module.param(p.key, p.init, shape, dtype), axes


class Block(nn.Module):
    """One pre-norm transformer block. Called by ``nn.scan`` over the stacked layers.

    Attributes are those of :class:`Llama`.
    """

    config: ModelConfig
    attention: Callable
    dtype: Any = jnp.float32
    mesh_axis_sizes: MeshAxisSizes = ()

    def _project(self, spec: str, x, name: str):
        """``x`` through this layer's weight ``layers/{name}`` by ``einsum(spec)``."""
        w, axes = _local_param(self, f"layers/{name}", self.dtype, self.mesh_axis_sizes)
        return contract(spec, x, w, axes, self.mesh_axis_sizes)

    def _norm(self, x, name: str):
        w, _ = _local_param(self, f"layers/{name}", self.dtype, self.mesh_axis_sizes)
        return rms_norm(x, w, self.config.norm_eps)

    @nn.compact
    def __call__(self, x, context, past):
        """``x [T, D]``; context = (positions, segments, past_pos, past_seg); past = (k, v) | None.

        Returns ``(x, (k_new, v_new))`` with ``k_new, v_new [T, Hkv_local, Dh]``.
        """
        cfg = self.config
        positions, segments, past_pos, past_seg = context

        h = self._norm(x, "attn_norm")
        q = self._project("td,dhk->thk", h, "wq")
        k = self._project("td,dhk->thk", h, "wk")
        v = self._project("td,dhk->thk", h, "wv")
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, positions, inv_freq).astype(self.dtype)
        k = apply_rope(k, positions, inv_freq).astype(self.dtype)

        layer_past = None if past is None else PastKV(past[0], past[1], past_pos, past_seg)
        out, _ = self.attention(q, k, v, positions, segments, layer_past)
        x = x + self._project("thk,hkd->td", out.astype(self.dtype), "wo")
        self.sow("intermediates", "after_attention", x)  # kept only when asked (diagnostics)

        h = self._norm(x, "mlp_norm")
        gate = self._project("td,df->tf", h, "w_gate")
        up = self._project("td,df->tf", h, "w_up")
        x = x + self._project("tf,fd->td", jax.nn.silu(gate) * up, "w_down")
        return x, (k, v)


class Llama(nn.Module):
    """Decoder-only Llama over one packed row of tokens.

    Attributes:
      config: shapes and numerics.
      attention: the attention plan (see module docstring).
      dtype: parameter and activation dtype (float32 or bfloat16); norms, RoPE, softmax
        statistics and logits are float32.
      mesh_axis_sizes: ``((mesh axis, size), ...)`` of the mesh the model runs inside
        (``shard_map``): parameters are the local shards that ``sharding.RULES`` implies and
        projections over split axes are summed across devices. ``()``: global arrays.
    """

    config: ModelConfig
    attention: Callable
    dtype: Any = jnp.float32
    mesh_axis_sizes: MeshAxisSizes = ()

    def setup(self):
        check_layout(self.mesh_axis_sizes)
        declare = lambda name: _local_param(
            self,
            name,
            self.dtype,  # noqa: E731
            self.mesh_axis_sizes,
        )[0]
        self.embed = declare("embed")
        self.final_norm = declare("final_norm")
        if not self.config.tie_embeddings:
            self.lm_head = declare("lm_head")
        scanned = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0),
            out_axes=0,
            length=self.config.n_layers,
        )
        self.layers = scanned(self.config, self.attention, self.dtype, self.mesh_axis_sizes)

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
        if self.config.tie_embeddings:  # contract with the [V, D] table as stored
            spec, w, name = "...d,vd->...v", self.embed, "embed"
        else:
            spec, w, name = "...d,dv->...v", self.lm_head, "lm_head"
        return contract(
            spec,
            hidden,
            w,
            _BY_NAME[name].axes,
            self.mesh_axis_sizes,
            preferred_element_type=jnp.float32,
        )


def init_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Random parameters (normal std 0.02, unit norms) as a plain pytree without ``'params'``."""
    return jax.jit(lambda key: table.init_tree(PARAMS, config, key, dtype))(jax.random.key(seed))


def param_shapes(config: ModelConfig, dtype=jnp.float32):
    """The parameter pytree's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), no compute."""
    return table.shape_tree(PARAMS, config, dtype)


def param_axes(config: ModelConfig) -> dict:
    """The parameter pytree's logical axes (``sharding.tree_specs(param_axes(c), params)``)."""
    return table.axes_tree(PARAMS, config)


def param_count(config: ModelConfig) -> int:
    """Number of parameters (the embedding counted once when tied)."""
    return table.count(PARAMS, config)


def check_param_shapes(config: ModelConfig, shapes: dict, what: str = "params") -> None:
    """Raise a :class:`CpjaxError` unless ``shapes`` (``{leaf name: shape}``) has exactly the
    leaves and shapes that ``config`` implies (:func:`param_shapes`), naming every mismatch."""
    table.check_shapes(PARAMS, config, shapes, what)
