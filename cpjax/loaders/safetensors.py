"""HF-layout Llama checkpoints (``config.json`` + ``*.safetensors``) <-> cpjax's parameter pytree.

The tensor names, HF shapes (``[out_features, in_features]`` weights) and the conversion to
cpjax's stacked pytree all come from the model's parameter table
(:data:`cpjax.model.llama.PARAMS`, machinery in :mod:`cpjax.model.params`); this module reads
and writes the files and ``config.json``. The helpers :func:`check_tensor_names` and
:func:`require_shape` are shared with the GGUF loader.
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
from cpjax.model import params as table
from cpjax.model.llama import PARAMS

Params = dict[str, Any]

# safetensors dtype names -> numpy dtypes (bfloat16 from ml_dtypes, which jax depends on).
_FLOAT_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def check_tensor_names(
    present: Iterable[str], expected: list[str], ignored: Callable[[str], bool], where: str
) -> None:
    """Raise :class:`CpjaxError` naming the first missing tensor, or the unexpected ones (those
    neither ``expected`` nor ``ignored``), before any tensor is converted."""
    present = set(present)
    missing = [name for name in expected if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CpjaxError(f"{where}: tensor {missing[0]!r} is missing{more}")
    unexpected = sorted(n for n in present - set(expected) if not ignored(n))
    if unexpected:
        raise CpjaxError(
            f"{where}: unexpected tensors {unexpected[:5]} (cpjax loads the plain "
            f"Llama architecture: no biases or extra modules)"
        )


def require_shape(array: np.ndarray, expected: tuple[int, ...], what: str) -> None:
    """Raise :class:`CpjaxError` naming ``what`` unless ``array`` has shape ``expected``."""
    require(
        tuple(array.shape) == tuple(expected),
        f"{what} has shape {tuple(array.shape)}, expected {tuple(expected)} for this config",
    )


# ------------------------------------------------------------------------------ config.json
def _rope_scaling(hf: dict, where: str) -> RopeScaling | None:
    """Llama-3 ``rope_scaling`` (or transformers-5 ``rope_parameters``); None for plain RoPE."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    require(
        rope_type == "llama3",
        f"{where}: rope scaling type {rope_type!r} is not supported (cpjax supports plain "
        f"RoPE and 'llama3')",
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


def config_from_hf(hf: dict, name: str, where: str) -> ModelConfig:
    """``ModelConfig`` from the dict of an HF ``LlamaForCausalLM`` ``config.json`` at ``where``."""
    require(
        hf.get("model_type") == "llama",
        f"{where}: model_type {hf.get('model_type')!r} is not supported (cpjax loads "
        f"'llama' checkpoints)",
    )
    require(
        hf.get("hidden_act", "silu") == "silu",
        f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (Llama uses 'silu')",
    )
    for flag in ("attention_bias", "mlp_bias"):
        require(
            not hf.get(flag, False),
            f"{where}: {flag}=true is not supported (cpjax's Llama has no biases)",
        )
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ):
        require(key in hf, f"{where}: required key {key!r} is missing")
    heads = int(hf["num_attention_heads"])
    rope = hf.get("rope_parameters") or {}
    bos = _token_ids(hf.get("bos_token_id"))
    try:
        return ModelConfig(
            name=name,
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            ffn_dim=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(hf, where),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=bos[0] if bos else None,
            eos_ids=_token_ids(hf.get("eos_token_id")),
        )
    except CpjaxError as exc:
        raise CpjaxError(f"{where}: {exc}") from None


def config_to_hf(config: ModelConfig) -> dict:
    """The ``config.json`` dict of ``config`` (the inverse of :func:`config_from_hf`)."""
    c = config
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_id,
        "eos_token_id": list(c.eos_ids) or None,
        "torch_dtype": "float32",
    }
    if c.rope_scaling is not None:
        s = c.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
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
        require(
            8 + header_len <= size,
            f"{path!r} is not a safetensors file (truncated or corrupt header)",
        )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CpjaxError(f"{path!r} is not a safetensors file (bad header: {exc})") from None
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    data = (
        np.memmap(path, np.uint8, mode="r", offset=8 + header_len)
        if data_len
        else np.zeros(0, np.uint8)
    )
    tensors = {}
    for name, info in header.items():
        dtype = _FLOAT_DTYPES.get(info["dtype"])
        require(
            dtype is not None,
            f"{path!r}: tensor {name!r} has dtype {info['dtype']}; cpjax reads "
            f"{', '.join(_FLOAT_DTYPES)} checkpoints",
        )
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        require(
            end <= data_len and end - start == math.prod(shape) * dtype.itemsize,
            f"{path!r}: tensor {name!r} ({info['dtype']} {list(shape)}) does not fit the "
            f"file (truncated or corrupt)",
        )
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
            require(
                name not in tensors,
                f"model directory {directory!r}: tensor {name!r} is "
                f"in both {origin.get(name)!r} and {file!r}",
            )
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
    lm_head = table.by_name(PARAMS)["lm_head"].hf
    check_tensor_names(
        tensors,
        table.tensor_names(PARAMS, config, "hf"),
        lambda n: n.endswith("rotary_emb.inv_freq") or n == lm_head,
        where,
    )

    def read(_, name: str, shape: tuple[int, ...]) -> np.ndarray:
        require_shape(tensors[name], shape, f"{where}: tensor {name!r}")
        return tensors[name]

    return config, table.params_from_checkpoint(PARAMS, config, read, "hf", dtype)


def save_safetensors(directory, config: ModelConfig, params: Params) -> None:
    """Write ``config.json`` and ``model.safetensors`` (float32, HF layout) into ``directory``.

    Tensor names and layouts come from the parameter table (the inverse of
    :func:`load_safetensors`). Each file is written to a temporary file in ``directory`` and
    renamed over the target.
    """
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = table.params_to_hf(PARAMS, config, params)
    with atomic_path(os.path.join(directory, "model.safetensors"), ".safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(directory, "config.json"), config_to_hf(config))
