"""UTF-8 byte tokenizer for the random ``tiny`` model (vocab 256, no special tokens)."""

from __future__ import annotations

from cpjax.errors import CpjaxError


class ByteTokenizer:
    """Token id = byte value. Same interface as ``cpjax.loaders.tokenizer.Tokenizer``."""

    vocab_size = 256
    bos_id = None
    eos_id = None
    eos_ids: tuple[int, ...] = ()
    chat_template = None

    def to_dict(self) -> dict:
        """JSON-ready description (the byte tokenizer has no state)."""
        return {"kind": "bytes"}

    @classmethod
    def from_dict(cls, data: dict) -> "ByteTokenizer":
        """The tokenizer that :meth:`to_dict` described."""
        if data.get("kind") != "bytes":
            raise CpjaxError(f"tokenizer kind {data.get('kind')!r}: expected 'bytes'")
        return cls()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        raise CpjaxError(
            "this model has no chat template (the byte tokenizer of the random "
            "'tiny' model); drop --chat or use a model with a chat template"
        )
