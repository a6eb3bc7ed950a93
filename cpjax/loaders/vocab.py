"""``tokenizers.Tokenizer`` backends rebuilt from a GGUF vocabulary, as HF transformers builds
them for ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` (so ids agree with HF).

* :func:`byte_level_bpe` (``tokenizer.ggml.model == "gpt2"``): tokens and merges from the file;
  tokens marked CONTROL (``<|im_start|>`` ...) are special tokens and USER_DEFINED ones added
  tokens, both matched whole in the text; the pre-tokenizer is chosen by ``tokenizer.ggml.pre``
  (Llama-3's split regex for the ``llama-bpe`` family, Mistral's for ``tekken``, GPT-2's
  byte-level regex otherwise). HF (and so cpjax) uses GPT-2's regex for SmolLM's ``smollm``
  too, where llama.cpp and the original ``tokenizer.json`` first split every digit: the ids
  differ only for a space before a non-ASCII numeric character (``" ²"``); ASCII digits have
  no merges in that vocabulary.
* :func:`sentencepiece_bpe` (``"llama"`` vocabularies of Gemma files): SentencePiece-style BPE
  over ``▁``-spelled spaces with byte fallback; the file has no merges, so they are rebuilt
  from the vocabulary, ranked by the order of the tokens in the file (Gemma's scores do not
  follow its merge order).
* :func:`byte_vocabulary`: one token per byte, id = byte value (the ``tiny`` model's).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: ``tokenizer.ggml.pre`` -> split regex applied before the byte-level mapping (as HF does).
_PRE_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "smaug-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
        ),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
}


@functools.lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, the alphabet of byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spelling = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in spelling]
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})
    return spelling


def _pre_tokenizer(pre: Optional[str]):
    from tokenizers import Regex, pre_tokenizers

    split = _PRE_SPLITS.get(pre)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], pre: Optional[str]
):
    """A ``tokenizers.Tokenizer`` for a GGUF byte-level BPE vocabulary (HF's construction).

    Tokens not written in the byte alphabet are respelled from their UTF-8 bytes; CONTROL tokens
    become special tokens (unless so respelled: llama.cpp mislabels), USER_DEFINED ones plain
    added tokens.
    """
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    spelled = [
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens
    ]
    backend = Backend(
        models.BPE(
            vocab={t: i for i, t in enumerate(spelled)},
            merges=[tuple(m.split(" ", 1)) for m in merges],
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, token_types)
            if kind == _CONTROL and set(t) <= alphabet
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind, s in zip(tokens, token_types, spelled)
            if kind == _USER_DEFINED and t == s
        ]
    )
    return backend


def byte_vocabulary():
    """A byte-level BPE without merges in which each byte's id is its value: the ``tiny``
    model's :class:`~cpjax.loaders.byte_tokenizer.ByteTokenizer` as a ``tokenizers.Tokenizer``
    (for export)."""
    spelling = _byte_spelling()
    return byte_level_bpe([spelling[b] for b in range(256)], [], [1] * 256, None)


def merges_from_vocab(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two tokens, best first.

    ``rank``: token -> score (higher merges first). Pieces of one token are ordered by the ids
    of their halves; all merges then by (score, length of the left half, of the right half),
    descending, stably: HF's ``generate_merges`` order.
    """
    merges = []
    for piece, score in rank.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def sentencepiece_bpe(tokens: Sequence[str], token_types: Sequence[int], unk_token: str):
    """A ``tokenizers.Tokenizer`` for a Gemma GGUF vocabulary (HF's ``GemmaTokenizer``).

    Tokens made only of spaces are stored with real spaces (``"  "``); they are respelled with
    ``▁`` as the model looks them up. Spaces become ``▁`` (no prefix space), the text is split
    after each space, unknown bytes fall back to ``<0xNN>`` tokens. CONTROL tokens are special,
    USER_DEFINED ones plain added tokens.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    rank = {t: -i for i, t in enumerate(spelled)}
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges_from_vocab(vocab, rank),
            fuse_unk=True,
            unk_token=unk_token,
            byte_fallback=True,
        )
    )
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    _add_marked_tokens(backend, tokens, token_types, lambda t: t in vocab)
    return backend


def _add_marked_tokens(backend, tokens, token_types, keep) -> None:
    """CONTROL tokens as special tokens, USER_DEFINED ones as plain added tokens (those for
    which ``keep(token)``)."""
    from tokenizers import AddedToken

    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, token_types)
            if kind == _CONTROL and keep(t)
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types)
            if kind == _USER_DEFINED and keep(t)
        ]
    )
