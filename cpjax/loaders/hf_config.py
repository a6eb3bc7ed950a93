"""HF ``config.json`` <-> :class:`~cpjax.config.ModelConfig`, one mapping per ``model_type``.

Supported: ``llama``, ``mistral`` (a window on every layer), ``qwen2`` (q/k/v biases; an
optional window on the layers from ``max_window_layers`` on), ``gemma3_text`` (Gemma 3's text
decoder: local/global layers, q/k norms, sandwich norms, GeGLU, scaled embeddings). Both the
classic keys (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``) and transformers 5's
``rope_parameters`` (per layer type for Gemma 3) are read.
"""

from __future__ import annotations

from typing import Optional

from cpjax.config import ModelConfig, RopeScaling
from cpjax.errors import CpjaxError, require

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
_HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
_GEMMA_PATTERN = 6  # Gemma 3: every 6th layer is global when config.json gives no layer_types


def _rope_scaling(rope: dict, where: str) -> Optional[RopeScaling]:
    """A ``rope_scaling`` / ``rope_parameters`` dict as a :class:`RopeScaling` (None: plain)."""
    rope = rope or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling(factor=float(rope["factor"]), rope_type="linear")
    require(
        rope_type == "llama3",
        f"{where}: rope scaling type {rope_type!r} is not supported (cpjax supports plain "
        f"RoPE, 'llama3' and 'linear')",
    )
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _token_ids(value) -> tuple[int, ...]:
    """An HF ``*_token_id`` entry (None, an int or a list of ints) as a tuple."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _layer_types(hf: dict, n_layers: int, default: tuple[str, ...], where: str) -> tuple:
    """HF ``layer_types`` (``"full_attention"``/``"sliding_attention"``) in cpjax's names, or
    ``default`` when absent."""
    types = hf.get("layer_types")
    if types is None:
        return default
    unknown = sorted(set(types) - set(_HF_LAYER_TYPES))
    require(not unknown, f"{where}: layer_types {unknown} are not supported")
    require(
        len(types) == n_layers,
        f"{where}: layer_types has {len(types)} entries for num_hidden_layers={n_layers}",
    )
    return tuple(_HF_LAYER_TYPES[t] for t in types)


def _common(hf: dict, name: str, where: str) -> dict:
    """The fields every family shares."""
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ):
        require(key in hf, f"{where}: required key {key!r} is missing")
    heads = int(hf["num_attention_heads"])
    bos = _token_ids(hf.get("bos_token_id"))
    return dict(
        name=name,
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        ffn_dim=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        bos_id=bos[0] if bos else None,
        eos_ids=_token_ids(hf.get("eos_token_id")),
    )


def _require_act(hf: dict, key: str, expected: str, where: str) -> None:
    value = hf.get(key, expected)
    require(
        value == expected,
        f"{where}: {key} {value!r} is not supported ({hf.get('model_type')} uses {expected!r})",
    )


def _llama_like(hf: dict, where: str) -> dict:
    """llama / mistral / qwen2: RoPE from ``rope_theta`` + ``rope_scaling`` (or
    ``rope_parameters``), SwiGLU, no MLP or output biases."""
    _require_act(hf, "hidden_act", "silu", where)
    rope = hf.get("rope_parameters") or {}
    require(not hf.get("mlp_bias", False), f"{where}: mlp_bias=true is not supported")
    return dict(
        rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(hf.get("rope_scaling") or rope, where),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _llama(hf: dict, n_layers: int, where: str) -> dict:
    require(
        not hf.get("attention_bias", False),
        f"{where}: attention_bias=true is not supported for model_type 'llama' (Qwen2 "
        f"checkpoints with q/k/v biases use model_type 'qwen2')",
    )
    return _llama_like(hf, where)


def _mistral(hf: dict, n_layers: int, where: str) -> dict:
    window = hf.get("sliding_window")
    return dict(_llama_like(hf, where), sliding_window=None if window is None else int(window))


def _qwen2(hf: dict, n_layers: int, where: str) -> dict:
    fields = dict(_llama_like(hf, where), family="qwen2", qkv_bias=True)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    if window is None:
        return fields
    first = int(hf.get("max_window_layers", n_layers))
    default = tuple("sliding" if i >= first else "full" for i in range(n_layers))
    types = _layer_types(hf, n_layers, default, where)
    return dict(fields, sliding_window=int(window), layer_types=types)


def _gemma3(hf: dict, n_layers: int, where: str) -> dict:
    _require_act(hf, "hidden_activation", "gelu_pytorch_tanh", where)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        require(hf.get(key) is None, f"{where}: {key}={hf.get(key)} is not supported")
    pattern = int(hf.get("sliding_window_pattern", _GEMMA_PATTERN))
    default = tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers))
    params = hf.get("rope_parameters") or {}
    full = params.get("full_attention") or {}
    local = params.get("sliding_attention") or {}
    return dict(
        family="gemma3",
        sliding_window=int(hf.get("sliding_window", 4096)),
        layer_types=_layer_types(hf, n_layers, default, where),
        rope_theta=float(hf.get("rope_theta", full.get("rope_theta", 1_000_000.0))),
        rope_scaling=_rope_scaling(hf.get("rope_scaling") or full, where),
        rope_local_theta=float(hf.get("rope_local_base_freq", local.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qk_norm=True,
        sandwich_norms=True,
        activation="gelu_tanh",
        scale_embeddings=True,
        norm_offset=1.0,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
    )


_FAMILY_FIELDS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gemma3_text": _gemma3}


def config_from_hf(hf: dict, name: str, where: str) -> ModelConfig:
    """``ModelConfig`` from the dict of an HF ``config.json`` at ``where``."""
    model_type = hf.get("model_type")
    hint = (
        " (the multimodal Gemma 3 checkpoint: cpjax loads the text decoder, model_type "
        "'gemma3_text')"
        if model_type == "gemma3"
        else ""
    )
    require(
        model_type in _FAMILY_FIELDS,
        f"{where}: model_type {model_type!r} is not supported; cpjax loads "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}{hint}",
    )
    common = _common(hf, name, where)
    try:
        return ModelConfig(**common, **_FAMILY_FIELDS[model_type](hf, common["n_layers"], where))
    except CpjaxError as exc:
        raise CpjaxError(f"{where}: {exc}") from None


def model_type(config: ModelConfig) -> str:
    """The HF ``model_type`` a checkpoint of ``config`` is written as."""
    if config.family == "gemma3":
        return "gemma3_text"
    if config.family == "qwen2":
        return "qwen2"
    return "mistral" if config.sliding_window is not None else "llama"


def _rope_to_hf(scaling: Optional[RopeScaling]) -> Optional[dict]:
    if scaling is None:
        return None
    if scaling.rope_type == "linear":
        return {"rope_type": "linear", "factor": scaling.factor}
    return {
        "rope_type": "llama3",
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }


def _whole_as_int(value: Optional[float]):
    """``value`` as an int when it is a whole number (``24.0 -> 24``), else unchanged."""
    return int(value) if value is not None and float(value).is_integer() else value


def config_to_hf(config: ModelConfig) -> dict:
    """The ``config.json`` dict of ``config`` (the inverse of :func:`config_from_hf`)."""
    c = config
    kind = model_type(c)
    require(
        kind != "mistral" or set(c.kinds) == {"sliding"},
        f"model {c.name!r}: a Llama-family model with both full and sliding layers has no HF "
        f"config.json form (Mistral slides on every layer)",
    )
    arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma3_text": "Gemma3"}
    hf = {
        "architectures": [f"{arch[kind]}ForCausalLM"],
        "model_type": kind,
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.ffn_dim,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_id,
        "eos_token_id": list(c.eos_ids) or None,
        "torch_dtype": "float32",
    }
    scaling = _rope_to_hf(c.rope_scaling)
    if scaling is not None:
        hf["rope_scaling"] = scaling
    hf_types = {v: k for k, v in _HF_LAYER_TYPES.items()}
    if kind == "gemma3_text":
        hf.update(
            hidden_activation="gelu_pytorch_tanh",
            # an int when whole: transformers 5 validates the field as an int
            query_pre_attn_scalar=_whole_as_int(c.query_pre_attn_scalar),
            sliding_window=c.sliding_window,
            layer_types=[hf_types[t] for t in c.kinds],
            rope_local_base_freq=c.rope_local_theta or c.rope_theta,
        )
        return hf
    hf["hidden_act"] = "silu"
    if kind == "mistral":
        hf["sliding_window"] = c.sliding_window
    if kind == "qwen2" and c.sliding_window is not None:
        hf.update(
            use_sliding_window=True,
            sliding_window=c.sliding_window,
            layer_types=[hf_types[t] for t in c.kinds],
        )
    return hf
