"""Tokenizer and chat template from GGUF metadata (or an HF ``tokenizer.json``).

The vocabulary is rebuilt with the ``tokenizers`` library (:mod:`cpjax.loaders.vocab`) the way
HF transformers builds it for ``AutoTokenizer.from_pretrained(..., gguf_file=...)``, so ids
agree with HF: byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3, Qwen2) and
Gemma's SentencePiece-style BPE (``"llama"`` in a ``gemma3`` file).

The chat template is rendered with jinja2 in a sandbox, with the options, helpers and variables
of HF's ``apply_chat_template``.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
from typing import Any, Optional, Sequence

from cpjax.errors import CpjaxError, require
from cpjax.loaders.gguf_reader import field, open_gguf
from cpjax.loaders.vocab import byte_level_bpe, sentencepiece_bpe

#: End-of-turn markers that also stop generation when the chat template writes them.
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # HF's override: jinja's own tojson escapes HTML characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[dict],
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
) -> str:
    """Render an HF-style chat template as HF's ``apply_chat_template(tokenize=False)`` does.

    ``special_tokens`` are the template variables ``bos_token``, ``eos_token``, ... (HF's
    ``special_tokens_map``); ``tools`` and ``documents`` are None.
    """
    from jinja2.exceptions import TemplateError

    for i, message in enumerate(messages):
        require(
            isinstance(message, dict) and "role" in message,
            f"messages[{i}]={message!r}: each chat message must be a dict with a 'role' "
            f"(and usually a 'content')",
        )
    try:
        return _compile(template).render(
            messages=copy.deepcopy(list(messages)),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except TemplateError as exc:
        raise CpjaxError(f"chat template failed to render: {exc}") from None


def _end_ids(backend, ids: Sequence[Optional[int]], template: Optional[str]) -> tuple[int, ...]:
    """``ids`` and the end-of-turn markers the chat template writes, deduplicated, in order."""
    markers = [backend.token_to_id(m) for m in _TURN_ENDS if template and m in template]
    return tuple(dict.fromkeys(int(i) for i in (*ids, *markers) if i is not None))


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model.

    Attributes:
      backend: the ``tokenizers.Tokenizer``.
      bos_id: the beginning-of-sequence id, or None.
      eos_ids: ids that end generation: EOS, end-of-turn (``<|im_end|>``, ``<|eot_id|>`` ... when
        the chat template uses them). ``eos_id`` is the first.
      add_bos_token: whether the model expects BOS before raw text (``tokenizer.ggml.
        add_bos_token``); chat templates write it themselves.
      chat_template: the jinja2 chat template, or None.
    """

    def __init__(
        self,
        backend,
        *,
        bos_id: Optional[int],
        eos_ids: Sequence[int],
        chat_template: Optional[str],
        special_tokens: dict[str, str],
        add_bos_token: bool = False,
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)
        self.add_bos_token = add_bos_token

    @property
    def eos_id(self) -> Optional[int]:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        """Number of ids (vocabulary plus added tokens)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""
        path = os.fspath(path)
        where = f"model file {path!r}"
        reader = open_gguf(path)
        kind = field(reader, "tokenizer.ggml.model")
        arch = field(reader, "general.architecture")
        tokens = field(reader, "tokenizer.ggml.tokens")
        require(
            tokens is not None, f"{where}: tokenizer metadata 'tokenizer.ggml.tokens' is missing"
        )
        types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            merges = field(reader, "tokenizer.ggml.merges")
            require(
                merges is not None,
                f"{where}: tokenizer metadata 'tokenizer.ggml.merges' is missing",
            )
            backend = byte_level_bpe(tokens, merges, types, field(reader, "tokenizer.ggml.pre"))
        else:
            require(
                kind == "llama" and arch == "gemma3",
                f"{where}: tokenizer type {kind!r} of architecture {arch!r} is not supported "
                f"(cpjax reads byte-level BPE vocabularies, 'gpt2', and Gemma 3's 'llama')",
            )
            unk = field(reader, "tokenizer.ggml.unknown_token_id")
            backend = sentencepiece_bpe(tokens, types, tokens[unk] if unk is not None else "<unk>")
        ids = {
            name: field(reader, f"tokenizer.ggml.{key}")
            for name, key in (
                ("bos_token", "bos_token_id"),
                ("eos_token", "eos_token_id"),
                ("unk_token", "unknown_token_id"),
                ("pad_token", "padding_token_id"),
            )
        }
        template = field(reader, "tokenizer.chat_template")
        return cls(
            backend,
            bos_id=ids["bos_token"],
            eos_ids=_end_ids(
                backend, (ids["eos_token"], field(reader, "tokenizer.ggml.eot_token_id")), template
            ),
            chat_template=template,
            special_tokens={k: tokens[i] for k, i in ids.items() if i is not None},
            add_bos_token=bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_file(cls, tokenizer_json) -> "Tokenizer":
        """An HF ``tokenizer.json``; special tokens and the chat template come from the
        ``tokenizer_config.json`` (or ``chat_template.jinja``) beside it."""
        from tokenizers import Tokenizer as Backend

        tokenizer_json = os.fspath(tokenizer_json)
        require(os.path.isfile(tokenizer_json), f"tokenizer file {tokenizer_json!r} does not exist")
        backend = Backend.from_file(tokenizer_json)
        folder = os.path.dirname(tokenizer_json)
        config: dict[str, Any] = {}
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if os.path.isfile(os.path.join(folder, "chat_template.jinja")):
            with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
                template = f.read()
        special = {
            name: (tok if isinstance(tok, str) else tok["content"])
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (tok := config.get(name)) is not None
        }
        bos = special.get("bos_token")
        eos = special.get("eos_token")
        return cls(
            backend,
            bos_id=None if bos is None else backend.token_to_id(bos),
            eos_ids=_end_ids(
                backend, (None if eos is None else backend.token_to_id(eos),), template
            ),
            chat_template=template,
            special_tokens=special,
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    def to_dict(self) -> dict:
        """Everything that rebuilds this tokenizer, JSON-ready (:meth:`from_dict` inverts it):
        the ``tokenizers`` JSON of the backend, special ids and tokens, the chat template."""
        return {
            "kind": "tokenizers",
            "backend": json.loads(self.backend.to_str()),
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
            "chat_template": self.chat_template,
            "special_tokens": self.special_tokens,
            "add_bos_token": self.add_bos_token,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Tokenizer":
        """The tokenizer that :meth:`to_dict` described."""
        from tokenizers import Tokenizer as Backend

        require(
            data.get("kind") == "tokenizers",
            f"tokenizer kind {data.get('kind')!r}: expected 'tokenizers'",
        )
        return cls(
            Backend.from_str(json.dumps(data["backend"])),
            bos_id=data["bos_id"],
            eos_ids=data["eos_ids"],
            chat_template=data["chat_template"],
            special_tokens=data["special_tokens"],
            add_bos_token=data["add_bos_token"],
        )

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text stay whole); BOS first
        if ``add_bos`` and the model has one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens (``<|im_end|>`` ...) dropped if ``skip_special``."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``), equal to
        HF's ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``."""
        require(self.chat_template is not None, "this model has no chat template; drop --chat")
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt, self.special_tokens
        )
