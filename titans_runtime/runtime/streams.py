"""Input streams: text files read lazily in blocks, tokenized, cut into fixed-length segments.

A stream is never held whole in memory: the file is read in blocks of `block_size` bytes (1 MiB by
default, 64 KiB for subword tokenizers), each block is tokenized on its own, and segments of
`segment_len` tokens are cut from the token sequence (the last one may be shorter). Each segment carries a `Cursor` that says where to resume
to get the segments after it, so a run restarted from a checkpointed segment boundary yields exactly the
segments an uninterrupted read would have yielded.

Block cuts (why resume is exact):
- Byte tokenizer: a token is a byte, so blocks may start anywhere; the token offset equals the byte
  offset and a cursor is just that offset.
- Text (subword) tokenizers: a block is the `block_size` bytes read from its start offset, cut after
  the last newline in it (else the last space or tab, else the last whole UTF-8 character; a
  separator in the block's second half is preferred, so blocks stay large). The next
  block starts at the cut. Block boundaries therefore depend only on the block's start offset, and a
  cursor is (start offset of a block, tokens of that block already used). Tokens near a cut can differ
  from tokenizing the whole file at once (e.g. sentencepiece adds its word-start marker at the start of
  every block); the result is deterministic, so resuming from a cursor is still exact.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

from titans_runtime.errors import InputError
from titans_runtime.model.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 1 << 20  # bytes read (and tokenized) at a time with the byte tokenizer
# Subword tokenizers: smaller blocks, because sentencepiece slows down on long strings (1 MiB in one call
# takes ~2x longer than in 64 KiB pieces), while a cut every 64 KiB changes a token about once per cut.
TEXT_BLOCK_SIZE = 64 << 10
_CUT_BYTES = (b"\n", b" ", b"\t")  # preferred block cuts for text tokenizers, best first
NUL = b"\0"


def _open_bytes(path: str):
    """Open a file for binary reading (a seam the tests instrument to check that reads are bounded)."""
    return open(path, "rb")


@dataclass(frozen=True)
class Cursor:
    """Where a stream resumes: the block starting at `byte_offset`, of which `skip_tokens` tokens were
    already used, and the token offset / seq_no of the next segment. JSON-able via to_dict/from_dict."""

    byte_offset: int = 0
    skip_tokens: int = 0
    token_offset: int = 0
    seq_no: int = 0
    block_size: int = 0  # the block size the cursor was made with; 0 = the stream's

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cursor":
        fields = cls.__dataclass_fields__
        unknown = set(data) - set(fields)
        if unknown:
            raise InputError(f"stream cursor: unknown keys {sorted(unknown)}")
        values = {}
        for key, value in data.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"stream cursor: {key} must be a non-negative integer, got {value!r}")
            values[key] = value
        return cls(**values)


@dataclass
class Segment:
    stream_id: str
    seq_no: int
    token_start: int          # offset of the first token in the stream
    token_end: int            # one past the last token
    tokens: torch.Tensor      # (token_end - token_start,) int64
    cursor_after: Cursor      # resume here to get the segment after this one

    def __len__(self) -> int:
        return self.token_end - self.token_start


def _is_byte_tokenizer(tokenizer: Any) -> bool:
    return isinstance(tokenizer, ByteTokenizer)


def _utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 character that starts with `lead` (1 for ASCII or a stray byte)."""
    if lead >> 5 == 0b110:
        return 2
    if lead >> 4 == 0b1110:
        return 3
    if lead >> 3 == 0b11110:
        return 4
    return 1


def _text_cut(data: bytes) -> int:
    """Length of the part of a full block to tokenize now: up to and including the last newline (else
    space or tab; one in the second half of the block first), else all whole UTF-8 characters."""
    for lowest in (len(data) // 2, 0):
        for sep in _CUT_BYTES:
            at = data.rfind(sep, lowest)
            if at >= 0:
                return at + 1
    end = len(data)
    start = end - 1  # find the lead byte of the last character
    while start > 0 and end - start < 4 and (data[start] & 0xC0) == 0x80:
        start -= 1
    if start > 0 and start + _utf8_length(data[start]) > end:
        return start  # the last character is incomplete: it goes to the next block
    return end


class TextStream:
    """One input file as a lazy sequence of token segments."""

    def __init__(self, path: str, stream_id: str, tokenizer: Any, segment_len: int,
                 block_size: int | None = None, allow_binary: bool = False):
        self.path = path
        self.stream_id = stream_id
        self.tokenizer = tokenizer
        self.segment_len = segment_len
        self.block_size = block_size or default_block_size(tokenizer)
        self.allow_binary = allow_binary
        self.byte_level = _is_byte_tokenizer(tokenizer)
        self.size_bytes = os.path.getsize(path)

    def __repr__(self) -> str:
        return f"TextStream({self.stream_id!r}, {self.size_bytes} bytes, segment_len={self.segment_len})"

    @property
    def n_tokens(self) -> int | None:
        """Total tokens when known without tokenizing (byte tokenizer: one per byte), else None."""
        return self.size_bytes if self.byte_level else None

    # ------------------------------------------------------------------------------------------ blocks
    def _tokenize(self, data: bytes, offset: int) -> torch.Tensor:
        nul = -1 if self.allow_binary else data.find(NUL)
        if nul >= 0:
            raise InputError(f"{self.path}: contains NUL bytes (byte {offset + nul}): binary, not a text file")
        if self.byte_level:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        ids = self.tokenizer.encode(data.decode("utf-8", errors="replace"))
        return torch.tensor(ids, dtype=torch.int64)

    def blocks(self, offset: int = 0, block_size: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start byte, end byte, tokens) of each block from `offset`. Each read asks for at most
        block_size bytes; a block is a function of its start offset only (see the module doc)."""
        block_size = block_size or self.block_size
        try:
            f = _open_bytes(self.path)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read ({e.strerror or e})") from None
        with f:
            f.seek(offset)
            rest = b""  # bytes read past the last cut: the start of the next block
            while True:
                try:
                    data = rest + f.read(block_size - len(rest))
                except OSError as e:
                    raise InputError(f"{self.path}: read failed at byte {offset + len(rest)} "
                                     f"({e.strerror or e})") from None
                if not data:
                    return
                full = len(data) == block_size
                cut = _text_cut(data) if (full and not self.byte_level) else len(data)
                rest = data[cut:]
                yield offset, offset + cut, self._tokenize(data[:cut], offset)
                offset += cut

    # ---------------------------------------------------------------------------------------- segments
    def segments(self, start: Cursor | None = None) -> Iterator[Segment]:
        """Fixed-length segments from `start` (the beginning by default); the last may be shorter."""
        cursor = start or Cursor()
        block_size = cursor.block_size or self.block_size
        if cursor.byte_offset > self.size_bytes:
            raise InputError(f"{self.path}: resume offset {cursor.byte_offset} is past the end of the file "
                             f"({self.size_bytes} bytes); was the file changed?")
        seq_no, token_offset = cursor.seq_no, cursor.token_offset
        blocks = self.blocks(cursor.byte_offset, block_size)
        try:
            block_start, block_end, tokens = next(blocks, (cursor.byte_offset, cursor.byte_offset, None))
            pos = cursor.skip_tokens
            if pos and (tokens is None or pos > len(tokens)):
                raise InputError(f"{self.path}: resume cursor skips {pos} tokens of a block that has "
                                 f"{0 if tokens is None else len(tokens)}; was the file or the tokenizer changed?")
            while tokens is not None:
                pieces, have = [], 0
                while have < self.segment_len and tokens is not None:
                    take = min(self.segment_len - have, len(tokens) - pos)
                    if take:
                        pieces.append(tokens[pos:pos + take])
                        have, pos = have + take, pos + take
                    if pos == len(tokens):  # block used up: the next one starts at its end
                        block_start, block_end, tokens = next(blocks, (block_end, block_end, None))
                        pos = 0
                if not have:
                    return
                if self.byte_level:  # any byte can start a block: point exactly at the next token
                    after = Cursor(block_start + pos, 0, token_offset + have, seq_no + 1, block_size)
                else:
                    after = Cursor(block_start, pos, token_offset + have, seq_no + 1, block_size)
                # A copy, so that a segment held in flight does not keep its whole block alive.
                segment_tokens = pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces)
                yield Segment(self.stream_id, seq_no, token_offset, token_offset + have, segment_tokens, after)
                seq_no, token_offset = seq_no + 1, token_offset + have
        finally:
            blocks.close()  # the file is closed even when the reader stops early


# ------------------------------------------------------------------------------------------- opening
def _check_text_file(path: str, allow_binary: bool, byte_level: bool) -> str | None:
    """None if `path` is a usable text stream, else why not (one line)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot access ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file"
    try:
        with _open_bytes(path) as f:
            head = f.read(64 * 1024)
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    nul = -1 if allow_binary else head.find(NUL)
    if nul >= 0:
        return f"contains NUL bytes (byte {nul}): binary, not a text file"
    if not byte_level and not allow_binary:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 3:  # a character cut by the read's end is fine
                return f"not UTF-8 text (invalid byte at {e.start})"
    return None


def _expand(path: str) -> list[str]:
    """A file as itself; a directory as its regular files (recursive, sorted, hidden ones skipped)."""
    if not os.path.isdir(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    return sorted(found)


def default_block_size(tokenizer: Any) -> int:
    return DEFAULT_BLOCK_SIZE if _is_byte_tokenizer(tokenizer) else TEXT_BLOCK_SIZE


def open_streams(paths: list[str], tokenizer: Any, segment_len: int, block_size: int | None = None,
                 allow_binary: bool = False) -> list[TextStream]:
    """Streams for files and directories (a directory gives its text files, sorted; empty or binary files
    inside it are skipped). Every problem is an InputError of one line naming the path.

    block_size: bytes read and tokenized at a time (None: by tokenizer, see default_block_size); a
    resume cursor carries the block size it was made with.
    allow_binary: stream files with NUL bytes as raw bytes (byte tokenizer only)."""
    if block_size is None:
        block_size = default_block_size(tokenizer)
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len <= 0:
        raise InputError(f"segment length must be a positive integer, got {segment_len!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16:
        raise InputError(f"block size must be an integer of at least 16 bytes, got {block_size!r}")
    byte_level = _is_byte_tokenizer(tokenizer)
    if allow_binary and not byte_level:
        raise InputError("binary input needs the byte tokenizer")
    if not paths:
        raise InputError("no input stream given")
    streams: list[TextStream] = []
    seen: dict[str, str] = {}
    for given in paths:
        given = str(given)
        if not os.path.lexists(given):
            raise InputError(f"input stream not found: {given}")
        if os.path.isdir(given):
            files = []
            for path in _expand(given):
                problem = _check_text_file(path, allow_binary, byte_level)
                if problem is None:
                    files.append(path)
                else:
                    log.info("skipping %s: %s", path, problem)
            if not files:
                raise InputError(f"{given}: directory has no non-empty text files")
        else:
            problem = _check_text_file(given, allow_binary, byte_level)
            if problem is not None:
                raise InputError(f"{given}: {problem}")
            files = [given]
        for path in files:
            real = os.path.realpath(path)
            if real in seen:
                raise InputError(f"{path}: the same file is given twice (also as {seen[real]})")
            seen[real] = path
            streams.append(TextStream(path, path, tokenizer, segment_len, block_size, allow_binary))
    return streams


def stream_by_id(streams: list[TextStream]) -> dict[str, TextStream]:
    return {s.stream_id: s for s in streams}


__all__ = ["Cursor", "Segment", "TextStream", "open_streams", "stream_by_id", "default_block_size",
           "DEFAULT_BLOCK_SIZE", "TEXT_BLOCK_SIZE"]
