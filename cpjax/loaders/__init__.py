"""Checkpoint and tokenizer loaders (GGUF, safetensors), ``load_model`` for ``--model``, and
``export_hf`` (an HF directory that transformers loads)."""

from cpjax.loaders.embedded import embedded_gguf_path
from cpjax.loaders.export import export_hf
from cpjax.loaders.gguf import load_gguf
from cpjax.loaders.safetensors import load_safetensors, save_safetensors
from cpjax.loaders.source import load_model
from cpjax.loaders.tokenizer import Tokenizer

__all__ = [
    "Tokenizer",
    "embedded_gguf_path",
    "export_hf",
    "load_gguf",
    "load_model",
    "load_safetensors",
    "save_safetensors",
]
