"""Functional Flax (Linen) decoder of every supported family: Llama, Mistral, Qwen2, Gemma 3.

The model works on one *packed row* of tokens ``[T]``: several sequences may share the row,
told apart by segment ids, and every token carries its global position. Attention is an
injected *plan* ``attention(q, k, v, positions, segments, past, window=None) -> (out, lse)``:
the new tokens' queries against their own keys/values and, if given, a ``past`` (one layer's
cached ``(k, v, pos, seg)``), seeing keys less than ``window`` positions back when a window is
given. ``cpjax.attention.with_past(attend)`` makes the single-device plan from any ``attend``
(DESIGN.md); the context-parallel plans (rings, cross-rank decode) live in ``cpjax.parallel``.
So the same model runs single-device, under a ring, or with a Pallas kernel.

The families differ only by switches of :class:`~cpjax.config.ModelConfig` (biases, q/k norms,
sandwich norms, GeGLU, embedding scale, norm offset, attention scale) and by the *type* of each
layer: ``"full"`` or ``"sliding"`` (a window, and for Gemma 3 its own RoPE base). The layers
run in one ``nn.scan``; a model with both types gives each layer its type index and picks the
attention plan with ``lax.switch`` (each branch has its window as a static number, so the
kernels and the rings see a plain window and skip what it hides).

Parameters are described once, in the family's table (:mod:`cpjax.model.families`: shapes,
logical axes, initialisers, HF and GGUF names and layouts); init, shapes, shardings, loaders,
export and the parameter count all derive from it. They form a plain pytree (``{'params': ...}``
for ``apply``) with layers stacked on a leading axis (``nn.scan``)::

    embed [V, D]; final_norm [D]; lm_head [D, V] (untied models only)
    layers: attn_norm [L, D], wq [L, D, Hq, Dh], wk/wv [L, D, Hkv, Dh], wo [L, Hq, Dh, D],
            mlp_norm [L, D], w_gate/w_up [L, D, F], w_down [L, F, D]
            (+ bq [L, Hq, Dh], bk/bv [L, Hkv, Dh] for Qwen2; + q_norm/k_norm [L, Dh],
            post_attn_norm/post_mlp_norm [L, D] for Gemma 3)

Inside ``shard_map`` (``mesh_axis_sizes`` given), each parameter is the local shard that
``cpjax.parallel.sharding.RULES`` implies, and every projection that contracts a split axis is
``psum``-ed over its mesh axis: editing ``RULES`` alone changes the tensor-parallel layout.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpjax.attention.layer_view import LayerView
from cpjax.attention.plans import PastKV
from cpjax.config import ModelConfig, RopeScaling
from cpjax.errors import require
from cpjax.model import params as table
from cpjax.model.families import TABLES, param_table
from cpjax.model.params import leaf_name, leaves_by_name
from cpjax.parallel.sharding import MeshAxisSizes, local_shape, split_axes, sum_axes

__all__ = [
    "Block",
    "KV_AXES",
    "Decoder",
    "Output",
    "PastKV",
    "REMAT_POLICIES",
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
]


#: Logical axes of the per-layer keys/values a forward pass returns (``Output.k``/``Output.v``).
KV_AXES = ("layers", "sequence", "kv_heads", "head_dim")
#: What a layer keeps from its forward for the backward pass (``Decoder.remat``); the rest is
#: recomputed. There is no "keep everything": inside the layer scan that would keep the
#: attention's whole score matrix (see :func:`attention_recomputed_in_backward`; measured:
#: 1.4 GB instead of 49-72 MB for an 8K-token step of the tiny model).
#: ``prevent_cse=False``: the layers run inside ``nn.scan``, where the recompute cannot be
#: merged with the forward anyway.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def attention_recomputed_in_backward(plan: Callable) -> Callable:
    """``plan`` under ``jax.checkpoint``: its backward recomputes the forward from the inputs.

    Why: the attention implementations and rings have hand-written backward passes
    (``jax.custom_vjp``) that need only their inputs and ``(out, lse)``. Inside the layer
    ``scan``, JAX 0.10's partial evaluation differentiates the custom-VJP forward itself and
    keeps every block's scores and mask for the backward: ``[n_q, n_k, Hkv, G*bq, bk]``, the
    whole ``T x T`` attention matrix (1.07 GB for one 8K-token layer of the tiny model).
    Measured on the compiled train step (tiny model, 8K tokens, one device): only a layer
    under ``jax.checkpoint`` (``REMAT_POLICIES``) with its attention under another avoids it
    (49 MB of temporaries; 72 MB with the CPU scheduler of ``cpjax.xla_env``); either alone
    keeps the matrix (1.41-1.44 GB). The price is one more
    attention forward in the backward. Inference never differentiates and is not wrapped.
    """

    def recomputed(q, k, v, positions, segments, past, window=None):
        forward = functools.partial(plan, window=window)
        return jax.checkpoint(forward)(q, k, v, positions, segments, past)

    return recomputed


#: Logical axes the forward keeps whole on every device: the layer scan, the residual stream,
#: RoPE and attention within a head, the embedding lookup and the logits.
WHOLE_AXES = ("layers", "embed", "head_dim", "vocab")


class Output(NamedTuple):
    """What a forward pass returns.

    hidden: ``[T, D]`` final-normed hidden states (feed them to ``Decoder.logits``).
    k, v: ``[L, T, Hkv, Dh]`` the new tokens' keys (after RoPE) and values, for a KV cache.
    """

    hidden: jax.Array
    k: jax.Array
    v: jax.Array


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> np.ndarray:
    """``[Dh/2]`` float32 inverse frequencies (a constant), scaled when ``scaling`` is set.

    The base ``1 / theta ** (2i / Dh)`` is the correctly rounded float32 of the power (the
    float32 exponent, as HF computes it); the Llama-3.1 smoothing follows HF's float32 ops one
    by one (``scalar / tensor`` is ``reciprocal(tensor) * scalar`` in torch), so Llama-3
    frequencies are bit-identical to HF's. (torch's vectorised ``powf`` is itself off by one ulp
    in a few frequencies of some (theta, Dh), e.g. one of 64 at 1e6/128; those stay correctly
    rounded here.)
    """
    f32 = np.float32
    exponent = np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)
    inv_freq = f32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)).astype(f32)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / f32(scaling.factor)
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = (f32(1.0) / inv_freq) * f32(2 * math.pi)
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(scaling.factor), inv_freq)
    smooth = ((f32(1.0) / wavelen) * f32(old_ctx) - f32(scaling.low_freq_factor)) / f32(
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (f32(1.0) - smooth) * scaled / f32(scaling.factor) + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(f32)


def layer_inv_freqs(config: ModelConfig) -> np.ndarray:
    """``[K, Dh/2]`` RoPE inverse frequencies of each attention kind (``config.attention_kinds``
    order): sliding layers use ``rope_local_theta`` (if set) and no scaling."""
    rows = []
    for kind in config.attention_kinds:
        if kind == "sliding" and config.rope_local_theta is not None:
            rows.append(rope_inv_freq(config.head_dim, config.rope_local_theta, None))
        else:
            rows.append(rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling))
    return np.stack(rows)


def layer_kind_indices(config: ModelConfig) -> np.ndarray:
    """``[L]`` int32: each layer's index into ``config.attention_kinds``."""
    kinds = config.attention_kinds
    return np.asarray([kinds.index(kind) for kind in config.kinds], np.int32)


def apply_rope(x, positions, inv_freq):
    """Rotate ``x [T, H, Dh]`` by ``positions [T]`` (HF "rotate_half" pairing i <-> i + Dh/2)."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rms_norm(x, weight, eps: float, offset: float = 0.0):
    """RMSNorm over the last axis in float32: ``x / rms(x) * (offset + weight)``, returned in
    ``x.dtype`` (``offset`` 1 for Gemma's norms)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = weight.astype(jnp.float32)
    if offset:
        scale = scale + offset
    return (scale * normed).astype(x.dtype)


def check_layout(mesh_axis_sizes: MeshAxisSizes) -> None:
    """Raise a :class:`CpjaxError` unless the sharding RULES give a layout this forward can run
    inside a ``shard_map`` over ``mesh_axis_sizes``: :data:`WHOLE_AXES` unsplit, and query and
    KV heads split alike (each device pairs its query heads with its own KV heads)."""
    for axis in WHOLE_AXES:
        split = split_axes((axis,), mesh_axis_sizes)[0]
        require(
            split is None,
            f"sharding RULES map logical axis {axis!r} to mesh axis {split and split[0]!r} "
            f"of size {split and split[1]}, but the decoder keeps {axis!r} whole on "
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


@functools.lru_cache(maxsize=None)
def _entry(family: str, name: str):
    """The entry ``name`` of the parameter table of ``family``."""
    return table.by_name(TABLES[family])[name]


def _local_param(module: nn.Module, name: str, dtype, mesh_axis_sizes: MeshAxisSizes):
    """Declare table entry ``name`` on ``module`` with its local shard shape (one layer's slice
    for a stacked entry, which ``nn.scan`` stacks); returns ``(array, its logical axes)``."""
    p = _entry(module.config.family, name)
    shape = local_shape(name, p.shape(module.config), p.axes, mesh_axis_sizes)
    axes = p.axes
    if p.stacked:
        shape, axes = shape[1:], axes[1:]
    return module.param(p.key, p.init, shape, dtype), axes


class Block(nn.Module):
    """One transformer block (pre-norm; Gemma 3 adds the post-norms). Called by ``nn.scan``
    over the stacked layers.

    Attributes are those of :class:`Decoder`.
    """

    config: ModelConfig
    attention: Callable
    dtype: Any = jnp.float32
    mesh_axis_sizes: MeshAxisSizes = ()

    def _weight(self, name: str):
        return _local_param(self, f"layers/{name}", self.dtype, self.mesh_axis_sizes)

    def _project(self, spec: str, x, name: str, bias: Optional[str] = None):
        """``x`` through this layer's weight ``layers/{name}`` by ``einsum(spec)``, plus the
        bias ``layers/{bias}`` if given."""
        w, axes = self._weight(name)
        y = contract(spec, x, w, axes, self.mesh_axis_sizes)
        return y if bias is None else y + self._weight(bias)[0]

    def _norm(self, x, name: str):
        cfg = self.config
        return rms_norm(x, self._weight(name)[0], cfg.norm_eps, cfg.norm_offset)

    def _qkv(self, h, positions, kind):
        """Queries, keys (normed per head if ``qk_norm``, rotated, queries pre-scaled) and
        values of ``h [T, D]``: ``[T, H(kv)_local, Dh]`` in ``self.dtype``."""
        cfg = self.config
        bias = cfg.qkv_bias
        q = self._project("td,dhk->thk", h, "wq", "bq" if bias else None)
        k = self._project("td,dhk->thk", h, "wk", "bk" if bias else None)
        v = self._project("td,dhk->thk", h, "wv", "bv" if bias else None)
        if cfg.qk_norm:
            q, k = self._norm(q, "q_norm"), self._norm(k, "k_norm")
        inv_freqs = layer_inv_freqs(cfg)
        inv_freq = inv_freqs[0] if len(inv_freqs) == 1 else jnp.asarray(inv_freqs)[kind]
        q = apply_rope(q, positions, inv_freq)
        if cfg.query_pre_attn_scalar is not None:  # attend scales by head_dim ** -0.5
            q = q * math.sqrt(cfg.head_dim / cfg.query_pre_attn_scalar)
        return q.astype(self.dtype), apply_rope(k, positions, inv_freq).astype(self.dtype), v

    def _attend(self, q, k, v, positions, segments, past, kind):
        """The attention plan of this layer's kind (``lax.switch`` when the model mixes
        kinds; each branch passes its window as a static number)."""
        cfg = self.config
        plans = [
            functools.partial(self.attention, window=cfg.window(kind_name))
            for kind_name in cfg.attention_kinds
        ]
        if len(plans) == 1:
            return plans[0](q, k, v, positions, segments, past)
        return jax.lax.switch(kind, plans, q, k, v, positions, segments, past)

    def _mlp(self, h):
        gate = self._project("td,df->tf", h, "w_gate")
        up = self._project("td,df->tf", h, "w_up")
        if self.config.activation == "gelu_tanh":
            act = jax.nn.gelu(gate, approximate=True)
        else:
            act = jax.nn.silu(gate)
        return self._project("tf,fd->td", act * up, "w_down")

    @nn.compact
    def __call__(self, x, context, layer):
        """``x [T, D]``; context = (positions, segments, past), past ``None`` or the stacked
        ``PastKV`` (``k, v [L, C, Hkv, Dh]``); layer = (this layer's index, its kind: index into
        ``attention_kinds``), int32 scalars.

        The layer reads its past in place as ``LayerView`` s of the stack: slicing it out per
        layer would copy the whole cache on every step (see ``cpjax.attention.layer_view``).
        Returns ``(x, (k_new, v_new))`` with ``k_new, v_new [T, Hkv_local, Dh]``.
        """
        positions, segments, past = context
        index, kind = layer
        layer_past = None
        if past is not None:
            layer_past = past._replace(k=LayerView(past.k, index), v=LayerView(past.v, index))
        sandwich = self.config.sandwich_norms

        q, k, v = self._qkv(self._norm(x, "attn_norm"), positions, kind)
        out, _ = self._attend(q, k, v, positions, segments, layer_past, kind)
        y = self._project("thk,hkd->td", out.astype(self.dtype), "wo")
        x = x + (self._norm(y, "post_attn_norm") if sandwich else y)
        self.sow("intermediates", "after_attention", x)  # kept only when asked (diagnostics)

        y = self._mlp(self._norm(x, "mlp_norm"))
        x = x + (self._norm(y, "post_mlp_norm") if sandwich else y)
        return x, (k, v)


class Decoder(nn.Module):
    """Decoder-only transformer over one packed row of tokens.

    Attributes:
      config: shapes and numerics.
      attention: the attention plan (see module docstring).
      dtype: parameter and activation dtype (float32 or bfloat16); norms, RoPE, softmax
        statistics and logits are float32.
      mesh_axis_sizes: ``((mesh axis, size), ...)`` of the mesh the model runs inside
        (``shard_map``): parameters are the local shards that ``sharding.RULES`` implies and
        projections over split axes are summed across devices. ``()``: global arrays.
      remat: ``None`` for inference (no backward pass). For training, what a layer keeps for
        the backward pass: ``full`` (only the layer's input: the backward recomputes the
        layer) or ``dots`` (also the outputs of the projections), see
        :data:`REMAT_POLICIES`; the attention inside is recomputed in every mode
        (:func:`attention_recomputed_in_backward`).
    """

    config: ModelConfig
    attention: Callable
    dtype: Any = jnp.float32
    mesh_axis_sizes: MeshAxisSizes = ()
    remat: Optional[str] = None

    def setup(self):
        check_layout(self.mesh_axis_sizes)
        declare = lambda name: _local_param(self, name, self.dtype, self.mesh_axis_sizes)[0]
        self.embed = declare("embed")
        self.final_norm = declare("final_norm")
        if not self.config.tie_embeddings:
            self.lm_head = declare("lm_head")
        block, attention = Block, self.attention
        if self.remat is not None:
            attention = attention_recomputed_in_backward(attention)
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        scanned = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0),  # context (with the whole past); (index, kind) per layer
            out_axes=0,
            length=self.config.n_layers,
        )
        self.layers = scanned(self.config, attention, self.dtype, self.mesh_axis_sizes)

    def __call__(self, tokens, positions, segments, past: Optional[PastKV] = None) -> Output:
        """Run the trunk.

        Args:
          tokens, positions, segments: ``[T]`` int32 (segment < 0 marks a padding token).
          past: optional earlier keys/values every new token may also attend to.

        Returns:
          :class:`Output` (final-normed hidden states and the new tokens' K/V per layer).
        """
        cfg = self.config
        x = jnp.take(self.embed, tokens, axis=0)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.dim), x.dtype)
        layers = (jnp.arange(cfg.n_layers, dtype=jnp.int32), jnp.asarray(layer_kind_indices(cfg)))
        x, (k, v) = self.layers(x, (positions, segments, past), layers)
        hidden = rms_norm(x, self.final_norm, cfg.norm_eps, cfg.norm_offset)
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
            _entry(self.config.family, name).axes,
            self.mesh_axis_sizes,
            preferred_element_type=jnp.float32,
        )


def init_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Random parameters (normal std 0.02, unit norms) as a plain pytree without ``'params'``."""
    return jax.jit(lambda key: table.init_tree(param_table(config), config, key, dtype))(
        jax.random.key(seed)
    )


def param_shapes(config: ModelConfig, dtype=jnp.float32):
    """The parameter pytree's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), no compute."""
    return table.shape_tree(param_table(config), config, dtype)


def param_axes(config: ModelConfig) -> dict:
    """The parameter pytree's logical axes (``sharding.tree_specs(param_axes(c), params)``)."""
    return table.axes_tree(param_table(config), config)


def param_count(config: ModelConfig) -> int:
    """Number of parameters (the embedding counted once when tied)."""
    return table.count(param_table(config), config)


def check_param_shapes(config: ModelConfig, shapes: dict, what: str = "params") -> None:
    """Raise a :class:`CpjaxError` unless ``shapes`` (``{leaf name: shape}``) has exactly the
    leaves and shapes that ``config`` implies (:func:`param_shapes`), naming every mismatch."""
    table.check_shapes(param_table(config), config, shapes, what)
