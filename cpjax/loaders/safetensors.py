"""HF-layout checkpoints (``config.json`` + ``*.safetensors``) <-> cpjax's parameter pytree.

The tensor names, HF shapes (``[out_features, in_features]`` weights) and the conversion to
cpjax's stacked pytree all come from the family's parameter table
(:mod:`cpjax.model.families`, machinery in :mod:`cpjax.model.params`); ``config.json`` maps
through :mod:`cpjax.loaders.hf_config`; this module reads and writes the files. The helpers
:func:`check_tensor_names` and :func:`require_shape` are shared with the GGUF loader.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from cpjax.config import ModelConfig
from cpjax.errors import CpjaxError, require
from cpjax.io import atomic_path, write_json
from cpjax.loaders.hf_config import config_from_hf, config_to_hf
from cpjax.model import params as table
from cpjax.model.families import param_table

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
            f"{where}: unexpected tensors {unexpected[:5]} (not part of this model family's "
            f"parameters: extra modules, or a config.json of another family)"
        )


def require_shape(array: np.ndarray, expected: tuple[int, ...], what: str) -> None:
    """Raise :class:`CpjaxError` naming ``what`` unless ``array`` has shape ``expected``."""
    require(
        tuple(array.shape) == tuple(expected),
        f"{what} has shape {tuple(array.shape)}, expected {tuple(expected)} for this config",
    )


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
    """Read an HF-layout checkpoint directory (``config.json`` + ``*.safetensors``).

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
    params_table = param_table(config)
    lm_head = table.by_name(params_table)["lm_head"].hf
    check_tensor_names(
        tensors,
        table.tensor_names(params_table, config, "hf"),
        lambda n: n.endswith("rotary_emb.inv_freq") or n == lm_head,
        where,
    )

    def read(_, name: str, shape: tuple[int, ...]) -> np.ndarray:
        require_shape(tensors[name], shape, f"{where}: tensor {name!r}")
        return tensors[name]

    return config, table.params_from_checkpoint(params_table, config, read, "hf", dtype)


def save_safetensors(directory, config: ModelConfig, params: Params) -> None:
    """Write ``config.json`` and ``model.safetensors`` (float32, HF layout) into ``directory``.

    Tensor names and layouts come from the parameter table (the inverse of
    :func:`load_safetensors`). Each file is written to a temporary file in ``directory`` and
    renamed over the target.
    """
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = table.params_to_hf(param_table(config), config, params)
    with atomic_path(os.path.join(directory, "model.safetensors"), ".safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(directory, "config.json"), config_to_hf(config))
