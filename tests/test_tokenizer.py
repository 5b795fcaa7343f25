"""Tokenizers: byte-level, sentencepiece (ids exactly sentencepiece's own) and Hugging Face tokenizer.json."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import sentencepiece

from titans_runtime.errors import InputError
from titans_runtime.model.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer

DATA = Path(__file__).parents[2] / "shared" / "data"
SP_MODEL = DATA / "tokenizers" / "llama2_tokenizer.model"
TEXTS = [
    "Hello world",
    "  leading spaces, trailing  ",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "Unicode: naïve café — 東京 🚀 ∑x²",
    "",
]


def shakespeare(n_chars: int = 20000) -> str:
    return (DATA / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:n_chars]


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.encode("hi", bos=True, eos=True) == [104, 105]  # no special tokens in a byte vocabulary


def test_sentencepiece_matches_sentencepiece_and_round_trips():
    tok = load_tokenizer(str(SP_MODEL))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SP_MODEL))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    text = shakespeare()
    ids = tok.encode(text)
    assert ids == sp.encode(text) and len(ids) < len(text) / 2  # real subwords, not bytes
    assert tok.decode(ids) == text
    for sample in TEXTS:
        assert tok.encode(sample) == sp.encode(sample)
        assert tok.decode(tok.encode(sample)) == sample
    assert tok.encode("Hello", bos=True, eos=True) == [1, *sp.encode("Hello"), 2]


def test_load_tokenizer_resolves_relative_paths_and_folders(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(SP_MODEL.read_bytes())
    assert load_tokenizer("tokenizer.model", tmp_path).vocab_size == 32000
    assert load_tokenizer(str(tmp_path)).vocab_size == 32000


def make_tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([shakespeare(5000)], trainer=trainer)
    tk.save(str(path))


def test_tokenizer_json_matches_tokenizers(tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "tokenizer.json"
    make_tokenizer_json(path)
    tok = load_tokenizer("tokenizer.json", tmp_path)
    reference = Tokenizer.from_file(str(path))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == reference.get_vocab_size()
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    for text in TEXTS + [shakespeare(3000)]:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.encode("to be", bos=True, eos=True) == [0, *tok.encode("to be"), 1]


def test_tokenizer_json_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(InputError, match=r"needs the `tokenizers` package \(pip install tokenizers\)"):
        load_tokenizer(str(path))


def test_tokenizer_errors_are_one_line(tmp_path):
    cases = [(str(tmp_path / "missing.model"), "tokenizer not found")]
    (tmp_path / "garbage.model").write_bytes(b"\x00\x01 not a model")
    cases.append((str(tmp_path / "garbage.model"), "not a sentencepiece model"))
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nIg== 1\n")  # Meta's Llama 3 format
    cases.append((str(tmp_path / "tiktoken.model"), "tiktoken BPE file"))
    (tmp_path / "bad.json").write_text("{not json")
    cases.append((str(tmp_path / "bad.json"), "not a tokenizers JSON file"))
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), "no tokenizer.model or tokenizer.json"))
    for spec, message in cases:
        with pytest.raises(InputError, match=message) as info:
            load_tokenizer(spec)
        assert "\n" not in str(info.value)
