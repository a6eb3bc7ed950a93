"""HF-layout Llama checkpoints (``config.json`` + ``*.safetensors``) <-> cpjax's parameter pytree.

The conversion between HF tensors (``[out_features, in_features]`` weights named
``model.layers.{i}.self_attn.q_proj.weight`` ...) and cpjax's stacked pytree lives here and is
shared with the GGUF loader, which first maps llama.cpp's tensors onto HF names and layout.

cpjax's pytree (numpy arrays; L layers, D dim, Hq/Hkv heads, Dh head dim, F ffn dim, V vocab)::

    {'embed': [V, D], 'final_norm': [D], 'lm_head': [D, V] (only when not tied),
     'layers': {'attn_norm': [L, D], 'wq': [L, D, Hq, Dh], 'wk': [L, D, Hkv, Dh],
                'wv': [L, D, Hkv, Dh], 'wo': [L, Hq, Dh, D], 'mlp_norm': [L, D],
                'w_gate': [L, D, F], 'w_up': [L, D, F], 'w_down': [L, F, D]}}

Every 2-D weight except the embedding is the HF weight transposed (``[in, out]``) and reshaped.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from cpjax.config import ModelConfig, RopeScaling
from cpjax.errors import CpjaxError, require
from cpjax.io import atomic_path, write_json

Params = dict[str, Any]
#: ``read(hf_name, hf_shape)`` returns that HF tensor as a float array of exactly ``hf_shape``.
TensorReader = Callable[[str, tuple[int, ...]], np.ndarray]

#: cpjax layer key -> HF weight name inside ``model.layers.{i}``.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
#: cpjax top-level key -> HF tensor name.
TOP_TENSORS = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
               "lm_head": "lm_head.weight"}

# safetensors dtype names -> numpy dtypes (bfloat16 from ml_dtypes, which jax depends on).
_FLOAT_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                 "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """cpjax key -> (HF shape ``[out, in]`` of one tensor, cpjax shape without the layer axis)."""
    c = config
    d, q, kv = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {
        "embed": ((c.vocab_size, d), (c.vocab_size, d)),
        "final_norm": ((d,), (d,)),
        "lm_head": ((c.vocab_size, d), (d, c.vocab_size)),
        "attn_norm": ((d,), (d,)),
        "wq": ((q, d), (d, c.n_heads, c.head_dim)),
        "wk": ((kv, d), (d, c.n_kv_heads, c.head_dim)),
        "wv": ((kv, d), (d, c.n_kv_heads, c.head_dim)),
        "wo": ((d, q), (c.n_heads, c.head_dim, d)),
        "mlp_norm": ((d,), (d,)),
        "w_gate": ((c.ffn_dim, d), (d, c.ffn_dim)),
        "w_up": ((c.ffn_dim, d), (d, c.ffn_dim)),
        "w_down": ((d, c.ffn_dim), (c.ffn_dim, d)),
    }


def hf_tensor_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name the checkpoint of ``config`` holds (no ``lm_head`` when tied)."""
    top = [TOP_TENSORS[k] for k in ("embed", "final_norm", "lm_head")
           if k != "lm_head" or not config.tie_embeddings]
    return top + [f"model.layers.{i}.{name}" for i in range(config.n_layers)
                  for name in LAYER_TENSORS.values()]


def _to_cpjax(key: str, weight: np.ndarray, shape: tuple[int, ...], dtype) -> np.ndarray:
    """One HF tensor in cpjax layout: ``[out, in]`` -> ``[in, out]`` reshaped to ``shape``."""
    if key != "embed" and weight.ndim == 2:
        weight = weight.T
    return weight.reshape(shape).astype(dtype, copy=False)


def _to_hf(key: str, param: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`_to_cpjax`, as a contiguous float32 array of ``hf_shape``."""
    param = np.asarray(param, np.float32)
    if key != "embed" and len(hf_shape) == 2:
        param = param.reshape(hf_shape[1], hf_shape[0]).T
    return np.ascontiguousarray(param.reshape(hf_shape))


def params_from_hf(config: ModelConfig, read: TensorReader, dtype=np.float32) -> Params:
    """cpjax params from HF-named, HF-layout tensors given by ``read`` (layers stacked on axis 0).

    Each stacked array is allocated once in ``dtype`` and filled layer by layer.
    """
    shapes = tensor_shapes(config)
    params: Params = {}
    for key in ("embed", "final_norm", "lm_head"):
        if key != "lm_head" or not config.tie_embeddings:
            hf_shape, shape = shapes[key]
            params[key] = _to_cpjax(key, read(TOP_TENSORS[key], hf_shape), shape, dtype)
    layers = {key: np.empty((config.n_layers, *shapes[key][1]), dtype) for key in LAYER_TENSORS}
    for i in range(config.n_layers):
        for key, name in LAYER_TENSORS.items():
            hf_shape, shape = shapes[key]
            layers[key][i] = _to_cpjax(key, read(f"model.layers.{i}.{name}", hf_shape), shape,
                                       dtype)
    params["layers"] = layers
    return params


def params_to_hf(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF name -> float32 ``[out, in]`` tensor for every tensor of ``params`` (inverse of
    :func:`params_from_hf`); ``params`` may hold numpy or jax arrays."""
    shapes = tensor_shapes(config)
    tensors = {TOP_TENSORS[key]: _to_hf(key, params[key], shapes[key][0])
               for key in ("embed", "final_norm", "lm_head")
               if key != "lm_head" or not config.tie_embeddings}
    for key, name in LAYER_TENSORS.items():
        stacked = params["layers"][key]
        for i in range(config.n_layers):
            tensors[f"model.layers.{i}.{name}"] = _to_hf(key, stacked[i], shapes[key][0])
    return tensors


def check_tensor_names(present: Iterable[str], expected: list[str],
                       ignored: Callable[[str], bool], where: str) -> None:
    """Raise :class:`CpjaxError` naming the first missing tensor, or the unexpected ones (those
    neither ``expected`` nor ``ignored``), before any tensor is converted."""
    present = set(present)
    missing = [name for name in expected if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CpjaxError(f"{where}: tensor {missing[0]!r} is missing{more}")
    unexpected = sorted(n for n in present - set(expected) if not ignored(n))
    if unexpected:
        raise CpjaxError(f"{where}: unexpected tensors {unexpected[:5]} (cpjax loads the plain "
                         f"Llama architecture: no biases or extra modules)")


def require_shape(array: np.ndarray, expected: tuple[int, ...], what: str) -> None:
    """Raise :class:`CpjaxError` naming ``what`` unless ``array`` has shape ``expected``."""
    require(tuple(array.shape) == tuple(expected),
            f"{what} has shape {tuple(array.shape)}, expected {tuple(expected)} for this config")


# ------------------------------------------------------------------------------ config.json
def _rope_scaling(hf: dict, where: str) -> RopeScaling | None:
    """Llama-3 ``rope_scaling`` (or transformers-5 ``rope_parameters``); None for plain RoPE."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    require(rope_type == "llama3",
            f"{where}: rope scaling type {rope_type!r} is not supported (cpjax supports plain "
            f"RoPE and 'llama3')")
    return RopeScaling(factor=float(rope["factor"]),
                       low_freq_factor=float(rope["low_freq_factor"]),
                       high_freq_factor=float(rope["high_freq_factor"]),
                       original_max_position_embeddings=int(
                           rope["original_max_position_embeddings"]))


def _token_ids(value) -> tuple[int, ...]:
    """An HF ``*_token_id`` entry (None, an int or a list of ints) as a tuple."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def config_from_hf(hf: dict, name: str, where: str) -> ModelConfig:
    """``ModelConfig`` from the dict of an HF ``LlamaForCausalLM`` ``config.json`` at ``where``."""
    require(hf.get("model_type") == "llama",
            f"{where}: model_type {hf.get('model_type')!r} is not supported (cpjax loads "
            f"'llama' checkpoints)")
    require(hf.get("hidden_act", "silu") == "silu",
            f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (Llama uses 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        require(not hf.get(flag, False), f"{where}: {flag}=true is not supported (cpjax's "
                                         f"Llama has no biases)")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
        require(key in hf, f"{where}: required key {key!r} is missing")
    heads = int(hf["num_attention_heads"])
    rope = hf.get("rope_parameters") or {}
    bos = _token_ids(hf.get("bos_token_id"))
    try:
        return ModelConfig(
            name=name, vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            ffn_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(hf, where),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=bos[0] if bos else None, eos_ids=_token_ids(hf.get("eos_token_id")))
    except CpjaxError as exc:
        raise CpjaxError(f"{where}: {exc}") from None


def config_to_hf(config: ModelConfig) -> dict:
    """The ``config.json`` dict of ``config`` (the inverse of :func:`config_from_hf`)."""
    c = config
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
          "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
          "head_dim": c.head_dim, "intermediate_size": c.ffn_dim, "hidden_act": "silu",
          "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
          "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
          "bos_token_id": c.bos_id, "eos_token_id": list(c.eos_ids) or None,
          "torch_dtype": "float32"}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                              "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings":
                                  s.original_max_position_embeddings}
    return hf


# ------------------------------------------------------------------------- .safetensors
def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one ``.safetensors`` file as a read-only memory-mapped numpy array.

    Parsed directly (8-byte header length, JSON header, data) so that bfloat16 works with any
    ``safetensors`` version and without torch. Only float dtypes are accepted.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else size
        require(8 + header_len <= size,
                f"{path!r} is not a safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CpjaxError(f"{path!r} is not a safetensors file (bad header: {exc})") from None
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    data = (np.memmap(path, np.uint8, mode="r", offset=8 + header_len) if data_len
            else np.zeros(0, np.uint8))
    tensors = {}
    for name, info in header.items():
        dtype = _FLOAT_DTYPES.get(info["dtype"])
        require(dtype is not None,
                f"{path!r}: tensor {name!r} has dtype {info['dtype']}; cpjax reads "
                f"{', '.join(_FLOAT_DTYPES)} checkpoints")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        require(end <= data_len and end - start == math.prod(shape) * dtype.itemsize,
                f"{path!r}: tensor {name!r} ({info['dtype']} {list(shape)}) does not fit the "
                f"file (truncated or corrupt)")
        tensors[name] = data[start:end].view(dtype).reshape(shape)
    return tensors


def _read_checkpoint(directory: str) -> dict[str, np.ndarray]:
    """All tensors of the ``*.safetensors`` files (shards) in ``directory``."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    require(files, f"model directory {directory!r} has no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for file in files:
        for name, array in read_safetensors_file(os.path.join(directory, file)).items():
            require(name not in tensors, f"model directory {directory!r}: tensor {name!r} is "
                                         f"in both {origin.get(name)!r} and {file!r}")
            tensors[name], origin[name] = array, file
    return tensors


def load_safetensors(directory, dtype=np.float32) -> tuple[ModelConfig, Params]:
    """Read an HF-layout Llama checkpoint directory (``config.json`` + ``*.safetensors``).

    Returns ``(ModelConfig, params)`` with params as documented in this module, in ``dtype``.
    F32, F16 and BF16 (and F64) tensors load; shards are found by their ``.safetensors`` suffix.
    """
    directory = os.fspath(directory)
    require(os.path.isdir(directory), f"model directory {directory!r} does not exist")
    config_path = os.path.join(directory, "config.json")
    require(os.path.isfile(config_path), f"model directory {directory!r} has no config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CpjaxError(f"{config_path!r} is not valid JSON: {exc}") from None
    name = os.path.basename(os.path.normpath(directory))
    config = config_from_hf(hf, name, config_path)
    tensors = _read_checkpoint(directory)
    where = f"model directory {directory!r}"
    # Unused extras: RoPE buffers of old checkpoints, and the copy of a tied output head.
    check_tensor_names(tensors, hf_tensor_names(config),
                       lambda n: n.endswith("rotary_emb.inv_freq") or n == TOP_TENSORS["lm_head"],
                       where)

    def read(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        require_shape(tensors[hf_name], shape, f"{where}: tensor {hf_name!r}")
        return tensors[hf_name]

    return config, params_from_hf(config, read, dtype)


def save_safetensors(directory, config: ModelConfig, params: Params) -> None:
    """Write ``config.json`` and ``model.safetensors`` (float32, HF layout) into ``directory``.

    Each file is written to a temporary file in ``directory`` and renamed over the target.
    """
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = params_to_hf(config, params)
    with atomic_path(os.path.join(directory, "model.safetensors"), ".safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(directory, "config.json"), config_to_hf(config))
