"""Every notebook in notebooks/ executes without error (nbclient, a fresh kernel each)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REAL_MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


def test_there_are_notebooks():
    assert {
        "01_quickstart.ipynb",
        "02_ring_attention_explained.ipynb",
        "03_scaling_model.ipynb",
        "04_long_context_finetune.ipynb",
    } <= set(NOTEBOOKS)


@pytest.mark.slow
@REAL_MODELS
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the notebook sets its own devices
    monkeypatch.setenv("PYTHONPATH", ROOT)
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    ).execute()
