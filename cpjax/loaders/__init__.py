"""Checkpoint and tokenizer loaders (GGUF, safetensors), and ``load_model`` for ``--model``."""

from cpjax.loaders.embedded import embedded_gguf_path
from cpjax.loaders.gguf import load_gguf
from cpjax.loaders.safetensors import load_safetensors, save_safetensors
from cpjax.loaders.source import load_model
from cpjax.loaders.tokenizer import Tokenizer

__all__ = [
    "Tokenizer",
    "embedded_gguf_path",
    "load_gguf",
    "load_model",
    "load_safetensors",
    "save_safetensors",
]
