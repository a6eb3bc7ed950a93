"""Streaming detokenization with stop strings.

Token ids become text incrementally; a multi-byte character split over tokens is held back
until complete, and so is any tail that could be the start of a stop string. When a stop string
appears, the text before it is emitted and the stream ends (the token generator is not consumed
further, so generation stops).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from cpjax.errors import require


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def stream_text(
    token_ids: Iterable[int],
    tokenizer,
    stop_strings: Sequence[str] = (),
    consumed: list | None = None,
) -> Iterator[str]:
    """Yield the text of ``token_ids`` piece by piece, ending before the first stop string.

    ``consumed`` (optional list) receives every token id read from ``token_ids``.
    """
    require(
        all(isinstance(s, str) and s for s in stop_strings),
        f"stop strings {list(stop_strings)!r}: each must be a non-empty string",
    )
    ids: list[int] = []
    printed = 0
    text = ""
    for token in token_ids:
        ids.append(int(token))
        if consumed is not None:
            consumed.append(int(token))
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):  # the rest of a multi-byte character is coming
            continue
        hits = [i for i in (text.find(s, max(0, printed - len(s))) for s in stop_strings) if i >= 0]
        if hits:
            end = min(hits)
            if end > printed:
                yield text[printed:end]
            return
        safe = len(text) - _held_back(text, stop_strings)
        if safe > printed:
            yield text[printed:safe]
            printed = safe
    if len(text) > printed:
        yield text[printed:]
