"""Tokenizers seen by the training stack.

``ByteTokenizer`` needs no files and round-trips any text exactly: it is the default of the tiny
preset and of the CPU demo. Special ids follow Seed-Coder: bos/pad/eos at 0/1/2, then the three
SPM fill-in-the-middle tokens; byte b is id ``BYTE_OFFSET + b``.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<[begin▁of▁sentence]>", "<[PAD▁TOKEN]>", "<[end▁of▁sentence]>",
                  "<[fim-suffix]>", "<[fim-prefix]>", "<[fim-middle]>")
BYTE_OFFSET = 16


class ByteTokenizer:
    bos = 0
    pad = 1
    eos = 2
    fim_suffix = 3
    fim_prefix = 4
    fim_middle = 5
    vocab_size = BYTE_OFFSET + 256

    @property
    def eod(self) -> int:
        return self.eos

    def encode(self, text: str) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256)
        return data.decode("utf-8", errors="replace")


def load_tokenizer(spec: str | None):
    """``None``/``"byte"``: :class:`ByteTokenizer`. Other kinds arrive with the data pipeline."""
    if spec in (None, "byte"):
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {spec!r}; supported here: 'byte'")
