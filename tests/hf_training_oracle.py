"""A PyTorch training oracle for tests: one plain SGD step of HF transformers on an HF directory.

Fine-tuning tests export a model (:func:`cpjax.loaders.export_hf`), take the same step with
cpjax and with :func:`torch_sgd_step`, and compare the losses and the updated parameters
(:func:`cpjax.loaders.load_safetensors` of ``out_dir``). Imported by tests only (needs the
``oracle`` extra: torch and transformers).
"""

from __future__ import annotations

import os
import shutil

import numpy as np


def torch_sgd_step(model_dir, tokens, learning_rate: float, out_dir) -> float:
    """One SGD step of the HF model in ``model_dir`` on ``tokens``; returns the loss before it.

    ``tokens``: ``[B, S]`` integer ids (numpy or nested lists). The loss is HF's causal-LM loss
    ``model(input_ids=tokens, labels=tokens).loss``: the mean next-token NLL over the
    ``B * (S - 1)`` pairs. The step is ``p -= learning_rate * p.grad`` for every parameter
    (float32, eager attention, no dropout); tied embeddings are one parameter, so their
    gradient sums both uses. The updated model is written to ``out_dir`` with
    ``save_pretrained`` (safetensors), and ``model_dir``'s JSON files (config.json, tokenizer and
    generation configs) are copied over HF's own, so that ``load_safetensors(out_dir)`` reads
    the new params with exactly the config of ``model_dir``.
    """
    import torch
    import transformers

    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    assert ids.ndim == 2 and ids.shape[1] >= 2, f"tokens must be [B, S >= 2], got {ids.shape}"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(model_dir), dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()  # no dropout; gradients flow all the same
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= learning_rate * p.grad
    out_dir = os.fspath(out_dir)
    model.save_pretrained(out_dir)
    for name in os.listdir(model_dir):
        if name.endswith(".json") and not name.endswith(".index.json"):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(out_dir, name))
    return float(loss.item())
