"""The parameter table of each model family (see :mod:`cpjax.model.params`).

One table per family says which weights exist, their shapes and logical axes, their HF
safetensors and GGUF names and layouts:

* ``llama`` (also Mistral, whose checkpoints use Llama's names): llama.cpp permutes the Q/K rows
  of its GGUF files (:func:`unpermute_rope_rows` undoes it).
* ``qwen2``: Llama's weights plus biases on the q/k/v projections; GGUF rows unpermuted.
* ``gemma3``: q/k RMSNorms per head, norms after attention and after the MLP (``sandwich``),
  HF's names for the norms differ from Llama's; llama.cpp stores every Gemma norm weight as
  ``w + 1`` (the forward's ``x * (1 + w)``), so the GGUF loader subtracts 1.

Axes: V vocab, D embed, L layers, Hq q_heads, Hkv kv_heads, Dh head_dim, F ffn. HF weights are
``[out, in]`` (``hf_in_axes`` leading axes are "in").
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from cpjax.config import ModelConfig
from cpjax.model.params import Param, Table

_normal = jax.nn.initializers.normal(stddev=0.02)
_ones = jax.nn.initializers.ones
_zeros = jax.nn.initializers.zeros
_LAYER = "model.layers.{layer}."
_BLK = "blk.{layer}."


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation of an ``[out, in]`` projection (``out = H * Dh``).

    llama.cpp's converter applies ``w.reshape(H, 2, Dh/2, in).swapaxes(1, 2).reshape(out, in)``
    (rotate_half pairs -> adjacent pairs) to Llama-architecture files; this is its inverse.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _norm(name: str, hf: str, gguf: str, size=lambda c: c.dim, axis="embed") -> Param:
    """A stacked RMSNorm weight ``[L, size]``."""
    return Param(
        f"layers/{name}",
        lambda c: (c.n_layers, size(c)),
        ("layers", axis),
        _ones,
        hf=_LAYER + hf,
        gguf=_BLK + gguf,
    )


def _projection(name: str, out: str, hf: str, gguf: str, **kw) -> Param:
    """A stacked ``[L, D, H, Dh]`` q/k/v projection (``out``: "q_heads" or "kv_heads")."""
    heads = (lambda c: c.n_heads) if out == "q_heads" else (lambda c: c.n_kv_heads)
    return Param(
        f"layers/{name}",
        lambda c: (c.n_layers, c.dim, heads(c), c.head_dim),
        ("layers", "embed", out, "head_dim"),
        _normal,
        hf=_LAYER + hf,
        gguf=_BLK + gguf,
        hf_in_axes=1,
        **kw,
    )


def _bias(name: str, out: str, hf: str, gguf: str) -> Param:
    """A stacked ``[L, H, Dh]`` projection bias, flat ``[H * Dh]`` in checkpoints."""
    heads = (lambda c: c.n_heads) if out == "q_heads" else (lambda c: c.n_kv_heads)
    return Param(
        f"layers/{name}",
        lambda c: (c.n_layers, heads(c), c.head_dim),
        ("layers", out, "head_dim"),
        _zeros,
        hf=_LAYER + hf,
        gguf=_BLK + gguf,
        hf_flat=True,
    )


def _mlp(name: str, hf: str, gguf: str, into_ffn: bool) -> Param:
    """A stacked MLP weight: ``[L, D, F]`` into the hidden layer, ``[L, F, D]`` out of it."""
    axes = ("embed", "ffn") if into_ffn else ("ffn", "embed")
    sizes = {"embed": lambda c: c.dim, "ffn": lambda c: c.ffn_dim}
    return Param(
        f"layers/{name}",
        lambda c: (c.n_layers, *(sizes[a](c) for a in axes)),
        ("layers", *axes),
        _normal,
        hf=_LAYER + f"mlp.{hf}.weight",
        gguf=_BLK + f"{gguf}.weight",
        hf_in_axes=1,
    )


LLAMA: Table = (
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
    _norm("attn_norm", "input_layernorm.weight", "attn_norm.weight"),
    _projection(
        "wq",
        "q_heads",
        "self_attn.q_proj.weight",
        "attn_q.weight",
        from_gguf=lambda w, c: unpermute_rope_rows(w, c.n_heads),
    ),
    _projection(
        "wk",
        "kv_heads",
        "self_attn.k_proj.weight",
        "attn_k.weight",
        from_gguf=lambda w, c: unpermute_rope_rows(w, c.n_kv_heads),
    ),
    _projection("wv", "kv_heads", "self_attn.v_proj.weight", "attn_v.weight"),
    Param(
        "layers/wo",
        lambda c: (c.n_layers, c.n_heads, c.head_dim, c.dim),
        ("layers", "q_heads", "head_dim", "embed"),
        _normal,
        hf=_LAYER + "self_attn.o_proj.weight",
        gguf=_BLK + "attn_output.weight",
        hf_in_axes=2,
    ),
    _norm("mlp_norm", "post_attention_layernorm.weight", "ffn_norm.weight"),
    _mlp("w_gate", "gate_proj", "ffn_gate", into_ffn=True),
    _mlp("w_up", "up_proj", "ffn_up", into_ffn=True),
    _mlp("w_down", "down_proj", "ffn_down", into_ffn=False),
)


def _replace(table: Table, **changes: dict) -> Table:
    """``table`` with the entries named in ``changes`` (``{"layers/wq": {field: value}}``;
    keys use ``__`` for ``/``) replaced field by field."""
    changes = {name.replace("__", "/"): fields for name, fields in changes.items()}
    return tuple(dataclasses.replace(p, **changes.get(p.name, {})) for p in table)


def _after(table: Table, name: str, *extra: Param) -> Table:
    """``table`` with ``extra`` entries inserted after entry ``name``."""
    i = [p.name for p in table].index(name) + 1
    return table[:i] + extra + table[i:]


#: Llama's table for the GGUF architectures whose Q/K rows llama.cpp leaves in HF order.
_UNPERMUTED: Table = _replace(LLAMA, layers__wq={"from_gguf": None}, layers__wk={"from_gguf": None})
QWEN2: Table = _after(
    _UNPERMUTED,
    "layers/wv",
    _bias("bq", "q_heads", "self_attn.q_proj.bias", "attn_q.bias"),
    _bias("bk", "kv_heads", "self_attn.k_proj.bias", "attn_k.bias"),
    _bias("bv", "kv_heads", "self_attn.v_proj.bias", "attn_v.bias"),
)


def _head_dim(config: ModelConfig) -> int:
    return config.head_dim


def _gemma_norm(p: Param) -> Param:
    """A Gemma RMSNorm weight: stored as ``w`` for ``x * (1 + w)`` (init 0); GGUF holds
    ``w + 1``."""
    return dataclasses.replace(p, init=_zeros, from_gguf=lambda w, c: w - np.float32(1.0))


_GEMMA3_LAYOUT: Table = _after(
    _after(
        _replace(_UNPERMUTED, layers__mlp_norm={"hf": _LAYER + "pre_feedforward_layernorm.weight"}),
        "layers/wv",
        _norm("q_norm", "self_attn.q_norm.weight", "attn_q_norm.weight", _head_dim, "head_dim"),
        _norm("k_norm", "self_attn.k_norm.weight", "attn_k_norm.weight", _head_dim, "head_dim"),
    ),
    "layers/wo",
    _norm("post_attn_norm", "post_attention_layernorm.weight", "post_attention_norm.weight"),
) + (_norm("post_mlp_norm", "post_feedforward_layernorm.weight", "post_ffw_norm.weight"),)
GEMMA3: Table = tuple(_gemma_norm(p) if p.name.endswith("norm") else p for p in _GEMMA3_LAYOUT)

TABLES: dict[str, Table] = {"llama": LLAMA, "qwen2": QWEN2, "gemma3": GEMMA3}


def param_table(config: ModelConfig) -> Table:
    """The parameter table of ``config.family``."""
    return TABLES[config.family]
