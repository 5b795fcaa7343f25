"""Input streams: lazy block reading, segments, resume cursors, directories and bad input."""
from __future__ import annotations

import json
import os
import pickle
import re
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch

from titans_runtime.errors import InputError
from titans_runtime.model.tokenizer import ByteTokenizer
from titans_runtime.runtime import streams as streams_mod
from titans_runtime.runtime.streams import Cursor, TextStream, _text_cut, open_streams

DATA = Path(__file__).parents[2] / "shared" / "data"
SP_MODEL = DATA / "tokenizers" / "llama2_tokenizer.model"

SAMPLE = ("Once upon a time, in a land far away — naïve café owners sang “hello” 👋 to the sea.\n"
          "The quick brown fox jumps over the lazy dog; 0123456789 ünïcødé ∑∫√ 漢字かな.\n"
          "averyveryverylongwordwithoutanyspaceatallthatkeepsgoingandgoing" * 3 + "\n\n")


class WordTokenizer:
    """Sentencepiece-like: a word keeps the whitespace before it (like '▁word'), the first piece of each
    encode() call gets a word-start marker, so tokens depend on where a text is cut."""

    vocab_size = 4096

    def encode(self, text: str) -> list[int]:
        pieces = re.findall(r"\s*\S+|\s+", text)
        if pieces and not pieces[0][0].isspace():
            pieces[0] = " " + pieces[0]  # the dummy prefix
        return [zlib.crc32(p.encode("utf-8")) % self.vocab_size for p in pieces]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError("hash tokens cannot be decoded")


class SentencePieceTokenizer:
    """The real llama2 sentencepiece model behind the encode/decode/vocab_size interface."""

    def __init__(self, path: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


def write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def all_segments(stream: TextStream, start: Cursor | None = None) -> list:
    return list(stream.segments(start))


def assert_same_segments(a: list, b: list) -> None:
    assert [(s.seq_no, s.token_start, s.token_end) for s in a] == [(s.seq_no, s.token_start, s.token_end) for s in b]
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens)
        assert x.cursor_after == y.cursor_after


def test_segments_and_cursors_survive_pickle_and_json(tmp_path):
    """Segments travel to Ray actors (pickle); cursors go into checkpoint metadata (JSON)."""
    path = write(tmp_path / "t.txt", SAMPLE)
    for tokenizer in (ByteTokenizer(), WordTokenizer()):
        (stream,) = open_streams([path], tokenizer, segment_len=10, block_size=64)
        seg = list(stream.segments())[2]
        back = pickle.loads(pickle.dumps(seg))
        assert_same_segments([back], [seg])
        assert back.stream_id == seg.stream_id == path
        assert Cursor.from_dict(json.loads(json.dumps(seg.cursor_after.to_dict()))) == seg.cursor_after
        assert seg.cursor_after.block_size == 64


def test_default_block_size_depends_on_the_tokenizer(tmp_path):
    path = write(tmp_path / "t.txt", SAMPLE)
    assert open_streams([path], ByteTokenizer(), 8)[0].block_size == streams_mod.DEFAULT_BLOCK_SIZE
    assert open_streams([path], WordTokenizer(), 8)[0].block_size == streams_mod.TEXT_BLOCK_SIZE
    (stream,) = open_streams([path], WordTokenizer(), 8, block_size=48)
    full = list(stream.segments())
    # A hand-made cursor without a block size takes the stream's.
    c = full[4].cursor_after
    assert_same_segments(list(stream.segments(Cursor(c.byte_offset, c.skip_tokens, c.token_offset, c.seq_no))),
                         full[5:])


# ------------------------------------------------------------------------------------- byte tokenizer
def test_byte_stream_equals_whole_file_across_many_blocks(tmp_path):
    text = SAMPLE * 60  # ~25 KB of mixed 1-4 byte UTF-8 characters, ~100 blocks of 256 bytes
    path = write(tmp_path / "book.txt", text)
    (stream,) = open_streams([path], ByteTokenizer(), segment_len=97, block_size=256)
    segments = all_segments(stream)
    data = text.encode("utf-8")
    assert stream.size_bytes == len(data) == stream.n_tokens
    assert torch.equal(torch.cat([s.tokens for s in segments]), torch.tensor(list(data)))
    assert [s.seq_no for s in segments] == list(range(len(segments)))
    assert all(len(s) == len(s.tokens) == 97 for s in segments[:-1])
    assert len(segments[-1]) == len(data) % 97 != 0
    for prev, nxt in zip(segments, segments[1:]):
        assert prev.token_end == nxt.token_start
        assert prev.cursor_after.token_offset == nxt.token_start and prev.cursor_after.seq_no == nxt.seq_no
    for s in segments:  # byte tokenizer: the token offset is the byte offset
        assert s.stream_id == path and s.tokens.dtype == torch.int64
        assert s.cursor_after.byte_offset == s.token_end and s.cursor_after.skip_tokens == 0


@pytest.mark.parametrize("size,lengths", [(100, [30, 30, 30, 10]), (90, [30, 30, 30]), (7, [7])])
def test_segment_lengths_and_the_short_last_one(tmp_path, size, lengths):
    path = write(tmp_path / "s.txt", "abcdefghij" * 10 if size == 100 else "x" * size)
    (stream,) = open_streams([path], ByteTokenizer(), segment_len=30, block_size=16)
    segments = all_segments(stream)
    assert [len(s) for s in segments] == lengths
    assert segments[-1].token_end == size
    assert segments[-1].cursor_after == Cursor(size, 0, size, len(lengths), 16)
    assert all_segments(stream, segments[-1].cursor_after) == []  # resuming at the end: nothing left


def test_byte_cursor_resume_equals_uninterrupted_at_every_boundary(tmp_path):
    path = write(tmp_path / "book.txt", SAMPLE * 8)
    (stream,) = open_streams([path], ByteTokenizer(), segment_len=23, block_size=50)
    full = all_segments(stream)
    for i, seg in enumerate(full):
        cursor = Cursor.from_dict(json.loads(json.dumps(seg.cursor_after.to_dict())))  # as a checkpoint stores it
        assert_same_segments(all_segments(stream, cursor), full[i + 1:])


def test_reader_never_reads_unbounded(tmp_path, monkeypatch):
    """Every read asks for a size (never the rest of the file), at most one block at a time."""
    sizes: list = []

    class Recording:
        def __init__(self, f):
            self.f = f

        def read(self, size=-1):
            sizes.append(size)
            return self.f.read(size)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = streams_mod._open_bytes
    monkeypatch.setattr(streams_mod, "_open_bytes", lambda p: Recording(real_open(p)))
    path = write(tmp_path / "big.txt", SAMPLE * 400)  # ~170 KB
    for tokenizer in (ByteTokenizer(), WordTokenizer()):
        sizes.clear()
        (stream,) = open_streams([path], tokenizer, segment_len=1000, block_size=4096)
        n_open_reads = len(sizes)
        assert sizes and all(isinstance(s, int) and 0 < s <= 64 * 1024 for s in sizes)  # validation: one head read
        sizes.clear()
        n = sum(len(s) for s in stream.segments())
        assert n > 0 and n_open_reads == 1
        assert len(sizes) > 40  # many block reads
        assert all(isinstance(s, int) and 0 < s <= 4096 for s in sizes)


def test_reading_a_large_file_keeps_memory_bounded(tmp_path):
    """An 8 MB file streamed in 64 KiB blocks: Python allocations stay far below the file size."""
    path = tmp_path / "large.txt"
    line = ("All the world's a stage, and all the men and women merely players. " * 4 + "\n").encode()
    with open(path, "wb") as f:
        for _ in range(8 * 1024 * 1024 // len(line)):
            f.write(line)
    size = os.path.getsize(path)
    (stream,) = open_streams([str(path)], ByteTokenizer(), segment_len=8192, block_size=64 * 1024)
    tracemalloc.start()
    try:
        total = 0
        for seg in stream.segments():
            total += len(seg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes while streaming a {size}-byte file"


# ------------------------------------------------------------------------------------- text tokenizers
def test_text_cut_prefers_newline_then_space_then_whole_characters():
    assert _text_cut(b"ab cd\nef gh") == 6
    assert _text_cut(b"ab cd ef") == 6
    assert _text_cut(b"abc\tdef") == 4
    assert _text_cut(b"a\nbcdefgh ij") == 10  # a newline early in the block loses to a late space
    assert _text_cut(b"a\nb cdefghij") == 2
    euro = "€".encode()  # 3 bytes
    assert _text_cut(b"abc" + euro[:2]) == 3  # a character cut by the block end moves to the next block
    assert _text_cut(b"abc" + euro[:1]) == 3
    assert _text_cut(b"abc" + euro) == 6
    assert _text_cut(b"abcd") == 4


def test_text_blocks_cover_the_file_at_whitespace_or_character_boundaries(tmp_path):
    text = SAMPLE * 10 + "漢" * 300  # ends with a long run without whitespace
    data = text.encode("utf-8")
    path = write(tmp_path / "t.txt", data)
    (stream,) = open_streams([path], WordTokenizer(), segment_len=10, block_size=64)
    blocks = list(stream.blocks())
    assert blocks[0][0] == 0 and blocks[-1][1] == len(data)
    for (s0, e0, _), (s1, _, _) in zip(blocks, blocks[1:]):
        assert e0 == s1 and 0 < e0 - s0 <= 64
        data[s0:e0].decode("utf-8")  # every block is whole characters
        # Cut after whitespace, unless the block read had none (then at a character boundary).
        assert data[e0 - 1:e0] in (b"\n", b" ", b"\t") or not re.search(rb"[ \t\n]", data[s0:s0 + 64])
        assert e0 - s0 > 32 or not re.search(rb"[ \t\n]", data[s0 + 32:s0 + 64])  # late cuts preferred
    joined = torch.cat([t for _, _, t in blocks])
    segments = all_segments(stream)
    assert torch.equal(torch.cat([s.tokens for s in segments]), joined)
    assert [len(s) for s in segments[:-1]] == [10] * (len(segments) - 1) and 0 < len(segments[-1]) <= 10


def test_text_cursor_resume_equals_uninterrupted_at_every_boundary(tmp_path):
    path = write(tmp_path / "t.txt", SAMPLE * 6)
    (stream,) = open_streams([path], WordTokenizer(), segment_len=7, block_size=48)
    full = all_segments(stream)
    assert any(s.cursor_after.skip_tokens for s in full)  # some boundaries fall inside a block
    for i, seg in enumerate(full):
        cursor = Cursor.from_dict(json.loads(json.dumps(seg.cursor_after.to_dict())))
        assert_same_segments(all_segments(stream, cursor), full[i + 1:])


@pytest.mark.skipif(not SP_MODEL.is_file(), reason="shared data (llama2 tokenizer) not present")
def test_sentencepiece_stream_resume_is_exact_and_close_to_whole_file(tmp_path):
    text = (DATA / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30000]
    path = write(tmp_path / "shakespeare.txt", text)
    tokenizer = SentencePieceTokenizer(SP_MODEL)
    (stream,) = open_streams([path], tokenizer, segment_len=64, block_size=2048)
    full = all_segments(stream)
    n_blocks = len(list(stream.blocks()))
    whole = tokenizer.encode(text)
    # Block-wise tokens differ from whole-file tokens only at block starts (a word-start marker each).
    assert abs(full[-1].token_end - len(whole)) <= n_blocks
    assert tokenizer.decode(full[0].tokens.tolist()) == tokenizer.decode(whole[:64])
    for i in (0, 3, len(full) // 2, len(full) - 2):
        assert_same_segments(all_segments(stream, full[i].cursor_after), full[i + 1:])


# ---------------------------------------------------------------------------------- several streams
def test_directory_expansion_and_several_streams(tmp_path):
    d = tmp_path / "books"
    b = write(d / "b.txt", "bee " * 10)
    a = write(d / "a.txt", "ay " * 10)
    c = write(d / "sub" / "c.md", "sea " * 10)
    write(d / ".hidden.txt", "hidden")
    write(d / "empty.txt", "")
    write(d / "weights.bin", b"\x00\x01\x02" * 10)
    solo = write(tmp_path / "solo.txt", "solo text")
    streams = open_streams([str(d), solo], ByteTokenizer(), segment_len=8)
    assert [s.stream_id for s in streams] == [a, b, c, solo]
    assert [s.path for s in streams] == [a, b, c, solo]
    for s in streams:
        assert bytes(torch.cat([seg.tokens for seg in s.segments()]).tolist()) == Path(s.path).read_bytes()


# --------------------------------------------------------------------------------------- bad input
def one_line_error(paths, tokenizer=None, segment_len=16, **kw) -> str:
    with pytest.raises(InputError) as err:
        streams = open_streams(paths, tokenizer or ByteTokenizer(), segment_len, **kw)
        for s in streams:
            for _ in s.segments():
                pass
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_bad_inputs_give_one_line_errors_naming_the_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    assert "not found" in one_line_error([missing]) and missing in one_line_error([missing])
    empty = write(tmp_path / "empty.txt", "")
    assert one_line_error([empty]) == f"{empty}: empty file"
    nul = write(tmp_path / "nul.txt", "text\x00more")
    for tok in (ByteTokenizer(), WordTokenizer()):
        msg = one_line_error([nul], tok)
        assert msg.startswith(f"{nul}: contains NUL bytes")
    utf16 = write(tmp_path / "utf16.txt", "hello".encode("utf-16"))
    assert "NUL" in one_line_error([utf16]) and utf16 in one_line_error([utf16])
    latin1 = write(tmp_path / "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    assert one_line_error([latin1], WordTokenizer()).startswith(f"{latin1}: not UTF-8 text")
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    assert one_line_error([fifo]) == f"{fifo}: not a regular file"
    no_text = tmp_path / "no_text"
    write(no_text / "e.txt", "")
    write(no_text / "z.bin", b"\x00" * 10)
    assert one_line_error([str(no_text)]) == f"{no_text}: directory has no non-empty text files"
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    assert str(empty_dir) in one_line_error([str(empty_dir)])
    ok = write(tmp_path / "ok.txt", "fine")
    for bad in (0, -3, "8", 2.0, True):
        assert "segment length" in one_line_error([ok], segment_len=bad)
    assert "given twice" in one_line_error([ok, str(tmp_path / "." / "ok.txt")])
    assert "no input stream" in one_line_error([])
    assert "byte tokenizer" in one_line_error([ok], WordTokenizer(), allow_binary=True)


def test_nul_bytes_after_the_first_block_fail_while_reading(tmp_path):
    path = write(tmp_path / "late.txt", b"a" * 100_000 + b"\x00" + b"b" * 10)
    (stream,) = open_streams([path], ByteTokenizer(), segment_len=1000, block_size=4096)
    with pytest.raises(InputError, match=r"late\.txt: contains NUL bytes \(byte 100000\)"):
        for _ in stream.segments():
            pass


def test_allow_binary_streams_raw_bytes(tmp_path):
    blob = bytes(range(256)) * 3
    path = write(tmp_path / "blob.bin", blob)
    (stream,) = open_streams([path], ByteTokenizer(), segment_len=100, allow_binary=True)
    assert torch.cat([s.tokens for s in stream.segments()]).tolist() == list(blob)


def test_bad_cursors(tmp_path):
    path = write(tmp_path / "t.txt", "short text")
    (stream,) = open_streams([path], ByteTokenizer(), segment_len=4)
    with pytest.raises(InputError, match="past the end of the file"):
        next(stream.segments(Cursor(byte_offset=11)))
    for bad in ({"byte_offset": -1}, {"offset": 3}, {"seq_no": "1"}, {"block_size": -1}):
        with pytest.raises(InputError, match="stream cursor"):
            Cursor.from_dict(bad)
    (text_stream,) = open_streams([path], WordTokenizer(), segment_len=4)
    with pytest.raises(InputError, match="resume cursor skips 50 tokens"):
        next(text_stream.segments(Cursor(byte_offset=0, skip_tokens=50)))
