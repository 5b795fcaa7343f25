"""Tokenizers: byte-level (built in, vocab 256), sentencepiece `tokenizer.model` (LLaMA 1/2) and Hugging Face
`tokenizer.json` (Llama 3; needs the optional `tokenizers` package).

All share one small interface: `vocab_size`, `bos_id`, `eos_id` (None when the tokenizer has none),
`encode(text, bos=False, eos=False) -> list[int]` and `decode(ids) -> str`."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from titans_runtime.errors import InputError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _wrap(ids: list[int], bos_id: int | None, eos_id: int | None, bos: bool, eos: bool) -> list[int]:
    return ([bos_id] if bos and bos_id is not None else []) + ids + ([eos_id] if eos and eos_id is not None else [])


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: lossless for any text, no files needed."""

    vocab_size = 256
    bos_id = None
    eos_id = None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A sentencepiece model file (LLaMA 1/2 `tokenizer.model`); ids are exactly sentencepiece's own."""

    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as exc:
            hint = " (a tiktoken BPE file, Meta's Llama 3 format: use the Hugging Face tokenizer.json)" if is_tiktoken(self.path) else ""
            raise InputError(f"{self.path}: not a sentencepiece model{hint or ' (' + str(exc).splitlines()[0] + ')'}") from None
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id = self._optional(self.sp.bos_id())
        self.eos_id = self._optional(self.sp.eos_id())

    @staticmethod
    def _optional(token_id: int) -> int | None:
        return None if token_id < 0 else int(token_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return _wrap(list(self.sp.encode(text)), self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. Llama 3), through the optional `tokenizers` package."""

    BOS_NAMES = ("<|begin_of_text|>", "<s>")
    EOS_NAMES = ("<|end_of_text|>", "</s>")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError:
            raise InputError(f"{self.path}: reading tokenizer.json needs the `tokenizers` package "
                             "(pip install tokenizers)") from None
        try:
            self.tk = _Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the package raises a bare Exception on a malformed file
            raise InputError(f"{self.path}: not a tokenizers JSON file ({str(exc).splitlines()[0]})") from None
        self.vocab_size = int(self.tk.get_vocab_size(with_added_tokens=True))
        self.bos_id = next((i for i in map(self.tk.token_to_id, self.BOS_NAMES) if i is not None), None)
        self.eos_id = next((i for i in map(self.tk.token_to_id, self.EOS_NAMES) if i is not None), None)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return _wrap(list(self.tk.encode(text, add_special_tokens=False).ids), self.bos_id, self.eos_id, bos, eos)

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)


def is_tiktoken(path: Path) -> bool:
    """Meta's Llama 3 tokenizer.model: lines of `<base64 token> <rank>`."""
    try:
        with open(path, "rb") as f:
            first = f.readline(512).split()
    except OSError:
        return False
    return len(first) == 2 and first[1].isdigit()


def load_tokenizer(spec: str = "byte", base_dir: str | Path | None = None) -> Tokenizer:
    """`byte`, or a tokenizer file or folder (relative paths resolve against base_dir, e.g. the model folder):
    `*.json` -> Hugging Face tokenizers, any other file -> sentencepiece; a folder -> its tokenizer.model or
    tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_dir():
        found = next((path / name for name in TOKENIZER_FILES if (path / name).is_file()), None)
        if found is None:
            raise InputError(f"{path}: no tokenizer.model or tokenizer.json in this folder")
        path = found
    if not path.is_file():
        raise InputError(f"tokenizer not found: {path}")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)
