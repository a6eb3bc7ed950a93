"""Tokenizer and chat template from GGUF metadata (or an HF ``tokenizer.json``).

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is rebuilt with the ``tokenizers`` library
from the vocabulary and merges in the file; control tokens (``<|im_start|>`` ...) are special
tokens that are never split. The pre-tokenizer follows ``tokenizer.ggml.pre`` as llama.cpp does
(SmolLM splits digits one by one before the GPT-2 byte-level split). The chat template is
rendered with jinja2 in a sandbox, with the same options as HF's ``apply_chat_template``.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from cpjax.errors import CpjaxError, require
from cpjax.loaders.gguf_reader import field, open_gguf

_CONTROL = 3  # llama.cpp token type CONTROL
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: Optional[str]):
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                 use_regex=True)])
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def render_chat_template(template: str, messages: Sequence[dict], add_generation_prompt: bool,
                         bos_token: str = "", eos_token: str = "") -> str:
    """Render an HF-style jinja2 chat template (sandboxed, trim/lstrip blocks, loop controls)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise CpjaxError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise CpjaxError(f"chat template failed to render: {exc}") from None


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model."""

    def __init__(self, backend, *, bos_id: Optional[int], eos_ids: Sequence[int],
                 chat_template: Optional[str]):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.chat_template = chat_template

    @property
    def eos_id(self) -> Optional[int]:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _token(self, token_id: Optional[int]) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as Backend

        reader = open_gguf(path)
        kind = field(reader, "tokenizer.ggml.model")
        require(kind == "gpt2", f"model file {os.fspath(path)!r}: tokenizer type {kind!r} is "
                                f"not supported (cpjax reads byte-level BPE, 'gpt2')")
        tokens = field(reader, "tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
        backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        backend.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        types = field(reader, "tokenizer.ggml.token_type", [])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, types) if kind == _CONTROL])
        eos = field(reader, "tokenizer.ggml.eos_token_id")
        eot = field(reader, "tokenizer.ggml.eot_token_id")
        bos = field(reader, "tokenizer.ggml.bos_token_id")
        return cls(backend, bos_id=bos, eos_ids=[t for t in (eos, eot) if t is not None],
                   chat_template=field(reader, "tokenizer.chat_template"))

    @classmethod
    def from_file(cls, tokenizer_json: str) -> "Tokenizer":
        """An HF ``tokenizer.json`` (chat template and specials from ``tokenizer_config.json``)."""
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(tokenizer_json)
        config_path = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        as_id = lambda tok: None if tok is None else backend.token_to_id(  # noqa: E731
            tok if isinstance(tok, str) else tok.get("content"))
        eos = as_id(config.get("eos_token"))
        return cls(backend, bos_id=as_id(config.get("bos_token")),
                   eos_ids=[] if eos is None else [eos],
                   chat_template=config.get("chat_template"))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text stay whole)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict],
                            add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``)."""
        require(self.chat_template is not None, "this model has no chat template; drop --chat")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self._token(self.bos_id),
                                    eos_token=self._token(self.eos_id))
