"""Where do NaN/Inf first appear in a forward pass? A layer-by-layer replay on one device.

Used by the engines' check mode (``Engine(check_finite=True)``, ``--check-finite``): when an
output holds a non-finite value, the same inputs (and the same cached keys/values) run again
here through the reference attention, one stage at a time, and the first stage whose output is
not finite is named, with the non-finite parameters of that stage if any.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cpjax.attention import reference, with_past
from cpjax.config import ModelConfig
from cpjax.model.decoder import (
    Block,
    Decoder,
    PastKV,
    layer_kind_indices,
    leaves_by_name,
    rms_norm,
)


def _finite(x, rows) -> bool:
    """All values of the real ``rows`` of ``x [T, ...]`` are finite."""
    return bool(np.isfinite(np.asarray(x, np.float32)[rows]).all())


def _bad_params(tree, prefix: str) -> list[str]:
    return [
        f"{prefix}{name}"
        for name, x in leaves_by_name(tree).items()
        if not np.isfinite(np.asarray(x, np.float32)).all()
    ]


def first_nonfinite(
    config: ModelConfig,
    params,
    tokens,
    positions,
    segments,
    past: Optional[PastKV] = None,
    dtype=jnp.float32,
) -> Optional[str]:
    """The first stage of the forward pass whose output holds NaN/Inf, or None if none does.

    Args:
      params: the full (unsharded) parameter pytree.
      tokens, positions, segments: ``[T]`` int32, as the engine ran them (rows with segment
        < 0 are padding and not checked).
      past: the cached keys/values the tokens attended to (``k, v [L, C, Hkv, Dh]``).
    Returns a phrase such as ``"layer 3 (attention)"`` or ``"the embedding"``, followed by the
    non-finite parameters of that stage when there are any.
    """
    tokens, positions, segments = (np.asarray(x, np.int32) for x in (tokens, positions, segments))
    rows = segments >= 0
    attention = with_past(reference.attend)
    x = jnp.take(jnp.asarray(params["embed"], dtype), tokens, axis=0)
    if config.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(config.dim), dtype)
    if not _finite(x, rows):
        return _named("the embedding", _bad_params({"embed": params["embed"]}, ""))
    if past is not None:
        past = PastKV(*(jnp.asarray(x) for x in past))
    context = (positions, segments, past)
    block = Block(config, attention, dtype)
    kinds = layer_kind_indices(config)
    for i in range(config.n_layers):
        layer = jax.tree.map(lambda w, i=i: jnp.asarray(w[i], dtype), params["layers"])
        (x, _), state = block.apply(
            {"params": layer}, x, context, (np.int32(i), kinds[i]), mutable=["intermediates"]
        )
        after_attention = state["intermediates"]["after_attention"][0]
        for stage, value in (("attention", after_attention), ("MLP", x)):
            if not _finite(value, rows):
                return _named(f"layer {i} ({stage})", _bad_params(layer, "layers/"))
    final_norm = jnp.asarray(params["final_norm"], dtype)
    hidden = rms_norm(x, final_norm, config.norm_eps, config.norm_offset)
    if not _finite(hidden, rows):
        return _named("the final norm", _bad_params({"final_norm": params["final_norm"]}, ""))
    logits = Decoder(config, attention, dtype).apply(
        {"params": params}, hidden, method=Decoder.logits
    )
    if not _finite(logits, rows):
        return _named("the output projection (logits)", _bad_params(params, ""))
    return None


def _named(stage: str, bad_params: list[str]) -> str:
    if not bad_params:
        return stage
    return f"{stage}, whose parameters {', '.join(bad_params)} hold NaN/Inf"
