"""Export a model as an HF-layout directory that ``transformers`` loads offline.

``export_hf(directory, config, params, tokenizer)`` writes::

    model.safetensors        float32, HF names and layouts (:func:`save_safetensors`)
    config.json              :func:`cpjax.loaders.hf_config.config_to_hf`
    generation_config.json   BOS and EOS ids, when known
    tokenizer.json           the ``tokenizers`` backend (the byte tokenizer of ``tiny`` as a
                             byte-level BPE without merges: id = byte value)
    tokenizer_config.json    ``PreTrainedTokenizerFast`` with the special tokens, whether BOS is
                             prepended, and the chat template

so that ``AutoModelForCausalLM.from_pretrained(directory)`` and
``AutoTokenizer.from_pretrained(directory)`` work, and ``load_model(directory)`` reads it back.

The target must be absent or an empty folder. Everything is written into a hidden sibling
(``.NAME.*.cpjax-export``) that is renamed to the target at the end, so the target is never
half-written; a failed export removes the sibling.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

from cpjax.config import ModelConfig
from cpjax.errors import require
from cpjax.loaders.byte_tokenizer import ByteTokenizer
from cpjax.loaders.safetensors import save_safetensors
from cpjax.loaders.tokenizer import Tokenizer
from cpjax.loaders.vocab import byte_vocabulary

#: Special-token names of :attr:`Tokenizer.special_tokens`, as HF's ``tokenizer_config.json``.
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def check_export_target(path) -> None:
    """A :class:`CpjaxError` unless ``path`` is absent or an empty folder (an export never
    replaces anything)."""
    path = os.fspath(path)
    require(
        not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)),
        f"export directory {path!r} exists and is not an empty folder (an export never "
        f"replaces files): remove it or choose another path",
    )


def as_tokenizer(tokenizer) -> Optional[Tokenizer]:
    """``tokenizer`` as a :class:`Tokenizer` (a ``tokenizers`` backend): the byte tokenizer of
    ``tiny`` becomes a byte-level BPE without merges (same ids); None stays None."""
    if isinstance(tokenizer, ByteTokenizer):
        return Tokenizer(
            byte_vocabulary(), bos_id=None, eos_ids=(), chat_template=None, special_tokens={}
        )
    return tokenizer


def _backend_json(tokenizer: Tokenizer) -> dict:
    """The ``tokenizer.json`` dict. When the model prepends BOS and the backend has no
    post-processor, one that prepends it is added (transformers 4 reads BOS from there;
    transformers 5 rebuilds the same one from ``add_bos_token``)."""
    data = json.loads(tokenizer.backend.to_str())
    bos = tokenizer.special_tokens.get("bos_token")
    if tokenizer.add_bos_token and bos is not None and data.get("post_processor") is None:
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}},
        }
    return data


def _tokenizer_config(tokenizer: Tokenizer, config: ModelConfig) -> dict:
    """The ``tokenizer_config.json`` dict (what :meth:`Tokenizer.from_file` reads back)."""
    hf: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    hf.update({k: tokenizer.special_tokens[k] for k in _SPECIAL if k in tokenizer.special_tokens})
    hf.update(
        add_bos_token=tokenizer.add_bos_token,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=config.max_seq_len,
    )
    if tokenizer.chat_template is not None:
        hf["chat_template"] = tokenizer.chat_template
    return hf


def _generation_config(config: ModelConfig, tokenizer: Optional[Tokenizer]) -> Optional[dict]:
    """``generation_config.json``: BOS and the ids that end generation (the tokenizer's, which
    include the chat template's end-of-turn markers), or None when neither is known."""
    bos = tokenizer.bos_id if tokenizer is not None and tokenizer.bos_id is not None else None
    eos = tuple(tokenizer.eos_ids) if tokenizer is not None and tokenizer.eos_ids else ()
    bos = config.bos_id if bos is None else bos
    eos = eos or tuple(config.eos_ids)
    if bos is None and not eos:
        return None
    generation: dict[str, Any] = {}
    if bos is not None:
        generation["bos_token_id"] = int(bos)
    if eos:
        generation["eos_token_id"] = [int(i) for i in eos] if len(eos) > 1 else int(eos[0])
    return generation


def hf_side_files(config: ModelConfig, tokenizer=None) -> dict[str, dict]:
    """File name -> JSON dict of the files beside the weights and ``config.json``: the
    generation config (when BOS/EOS are known) and, given a tokenizer, ``tokenizer.json`` and
    ``tokenizer_config.json``."""
    tokenizer = as_tokenizer(tokenizer)
    files = {}
    generation = _generation_config(config, tokenizer)
    if generation is not None:
        files["generation_config.json"] = generation
    if tokenizer is not None:
        files["tokenizer.json"] = _backend_json(tokenizer)
        files["tokenizer_config.json"] = _tokenizer_config(tokenizer, config)
    return files


def export_hf(directory, config: ModelConfig, params, tokenizer=None) -> list[str]:
    """Write ``(config, params, tokenizer)`` as an HF directory (module docstring) at
    ``directory``, which must be absent or empty; returns the names of the files written.

    ``params``: the model's pytree (numpy or jax arrays, any float dtype; written as float32).
    ``tokenizer``: a :class:`Tokenizer`, a :class:`ByteTokenizer` or None (no tokenizer files).
    """
    directory = os.path.abspath(os.fspath(directory))
    check_export_target(directory)
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".cpjax-export", dir=parent)
    try:
        save_safetensors(staging, config, params)
        for file, data in hf_side_files(config, tokenizer).items():
            with open(os.path.join(staging, file), "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private
        check_export_target(directory)
        os.replace(staging, directory)  # an empty folder at ``directory`` is replaced too
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return sorted(os.listdir(directory))
