"""Tokenizers: byte-level (built in, vocab 256)."""
from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: lossless for any text, no files needed."""

    vocab_size = 256
    bos_id = None
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(spec: str = "byte", base_dir: str | None = None):
    """`byte`, or a tokenizer file (sentencepiece tokenizer.model; resolved against base_dir if relative)."""
    if spec == "byte":
        return ByteTokenizer()
    from titans_runtime.errors import InputError

    raise InputError(f"unsupported tokenizer {spec!r}")
