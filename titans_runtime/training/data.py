"""Training data: corpora read through the runtime's lazy stream reader (tail of every file held out),
mixed with synthetic long-range tasks that only a memory reaching past the attention window can solve:

- repeat after a gap: a passage A (corpus text, or a shuffled slice of it), unrelated text, then A again;
- the same in random tokens end to end: nothing but the memory predicts anything in it, so the gradient
  of the second A reaches the memory undiluted by language modelling (the signal that first teaches
  the outer loop to write and read);
- pass-key facts: "The pass key is 12345. Remember it. ..." haystack "... What is the pass key? The pass
  key is 12345."

Every sequence is a pure function of (seed, sequence index), so a resumed run sees exactly the data an
uninterrupted one would have seen: the data position is just the step number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from titans_runtime.errors import InputError
from titans_runtime.runtime.streams import open_streams
from titans_runtime.training.config import DataConfig

READ_SEGMENT = 1 << 16  # tokens per segment when reading a corpus file through the stream reader


@dataclass
class Corpus:
    """Token ids of each file, split into a training head and a held-out tail."""

    names: list[str]
    train: list[Tensor]
    heldout: list[Tensor]

    def parts(self, split: str) -> list[Tensor]:
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}")
        return self.train if split == "train" else self.heldout

    def sample(self, rng: np.random.Generator, length: int, split: str = "train") -> Tensor:
        """A random contiguous slice of `length` tokens (a file is picked in proportion to its size)."""
        parts = [p for p in self.parts(split) if p.numel() > length]
        if not parts:
            raise InputError(f"no {split} text longer than {length} tokens in {', '.join(self.names)}")
        sizes = np.array([p.numel() for p in parts], dtype=np.float64)
        part = parts[int(rng.choice(len(parts), p=sizes / sizes.sum()))]
        start = int(rng.integers(0, part.numel() - length))
        return part[start:start + length].to(torch.long)


def read_tokens(path_or_stream: Any) -> Tensor:
    """All token ids of one stream, read lazily block by block and stored compactly."""
    pieces = [seg.tokens.to(torch.int32) for seg in path_or_stream.segments()]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def load_corpus(paths: list[str], tokenizer: Any, holdout_fraction: float) -> Corpus:
    """Read every text file under `paths`; the last `holdout_fraction` of each is held out."""
    streams = open_streams(list(paths), tokenizer, READ_SEGMENT)
    names, train, heldout = [], [], []
    for stream in streams:
        tokens = read_tokens(stream)
        cut = int(round(tokens.numel() * (1.0 - holdout_fraction)))
        names.append(stream.stream_id)
        train.append(tokens[:cut])
        heldout.append(tokens[cut:])
    return Corpus(names, train, heldout)


# ------------------------------------------------------------------------------------- synthetic tasks
def passkey_texts(key: str) -> tuple[str, str, str]:
    """(needle, question, answer) of the pass-key task; the answer follows the question directly."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is "
    return needle, question, key


def random_key(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(10000, 100000))}"


def encode(tokenizer: Any, text: str) -> Tensor:
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


@dataclass
class PassKeyExample:
    tokens: Tensor          # needle + haystack + question + answer
    answer_start: int       # index of the first answer token in `tokens`
    answer_end: int


def passkey_example(tokenizer: Any, key: str, haystack: Tensor) -> PassKeyExample:
    needle, question, answer = passkey_texts(key)
    head = torch.cat((encode(tokenizer, needle), haystack, encode(tokenizer, question)))
    ans = encode(tokenizer, answer)
    return PassKeyExample(torch.cat((head, ans)), head.numel(), head.numel() + ans.numel())


def _fill(corpus: Corpus, rng: np.random.Generator, length: int, split: str) -> Tensor:
    return corpus.sample(rng, length, split) if length > 0 else torch.zeros(0, dtype=torch.long)


def span_weights(length: int, rest: float, start: int, stop: int, weight: float) -> Tensor:
    """Loss weights of a task sequence: `weight` on tokens start..stop-1 (what only a memory predicts),
    `rest` everywhere else."""
    weights = torch.full((length,), float(rest))
    weights[start:stop] = weight
    return weights


def repeat_layout(rng: np.random.Generator, length: int, cfg: DataConfig, min_gap: int) -> tuple[int, int, int]:
    """Where a repeat goes in `length` tokens: (passage length, lead before it, gap before the second reading;
    the gap >= min_gap where it fits)."""
    la = min(int(rng.integers(cfg.passage_min, cfg.passage_max + 1)), max(1, length // 3))
    room = length - 2 * la
    gap = int(rng.integers(min(min_gap, room), room + 1))
    lead = int(rng.integers(0, room - gap + 1))
    return la, lead, gap


def repeat_sequence(corpus: Corpus, rng: np.random.Generator, length: int, cfg: DataConfig, min_gap: int,
                    split: str = "train") -> tuple[Tensor, Tensor]:
    """text, A, gap text (>= min_gap where it fits), A again, text: `length` tokens, and their loss weights
    (`recall_weight` on the second A, `context_weight` elsewhere)."""
    la, lead, gap = repeat_layout(rng, length, cfg, min_gap)
    room = length - 2 * la
    passage = corpus.sample(rng, la, split)
    if cfg.shuffled_share > 0 and rng.random() < cfg.shuffled_share:
        # The same tokens in random order: no language model predicts them, only a memory of the first
        # reading does, which is the clearest signal for learning to write and read it.
        passage = passage[torch.from_numpy(rng.permutation(la))]
    parts = [_fill(corpus, rng, lead, split), passage, _fill(corpus, rng, gap, split), passage,
             _fill(corpus, rng, room - gap - lead, split)]
    second = lead + la + gap
    return torch.cat(parts), span_weights(length, cfg.context_weight, second, second + la, cfg.recall_weight)


def noise_repeat_sequence(corpus: Corpus, rng: np.random.Generator, length: int, cfg: DataConfig, min_gap: int,
                          split: str = "train") -> tuple[Tensor, Tensor]:
    """noise, A, noise gap (>= min_gap where it fits), A again, noise: `length` random tokens over an
    alphabet of `noise_alphabet` tokens that occur in the corpus. Returns the tokens and their loss weights:
    `noise_weight` on the second A, 0 elsewhere (noise is unpredictable by construction; its loss would only
    add gradient noise that drowns the recall signal)."""
    alphabet = corpus.sample(rng, 4 * cfg.noise_alphabet, split).unique()
    alphabet = alphabet[torch.from_numpy(rng.permutation(alphabet.numel())[:cfg.noise_alphabet])]
    noise = alphabet[torch.from_numpy(rng.integers(0, alphabet.numel(), length))]
    la, lead, gap = repeat_layout(rng, length, cfg, min_gap)
    second = lead + la + gap
    noise[second:second + la] = noise[lead:lead + la]
    return noise, span_weights(length, 0.0, second, second + la, cfg.noise_weight)


def passkey_sequence(corpus: Corpus, tokenizer: Any, rng: np.random.Generator, length: int,
                     split: str = "train", answer_weight: float = 1.0,
                     context_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """text, needle, haystack, question + answer, text: `length` tokens, and their loss weights
    (`answer_weight` on the answer, `context_weight` elsewhere)."""
    key = random_key(rng)
    empty = passkey_example(tokenizer, key, torch.zeros(0, dtype=torch.long))
    room = length - empty.tokens.numel()
    if room < 0:  # no room for the task: plain text
        return corpus.sample(rng, length, split), torch.ones(length)
    hay = int(rng.integers(0, room + 1))
    lead = int(rng.integers(0, room - hay + 1))
    example = passkey_example(tokenizer, key, _fill(corpus, rng, hay, split))
    tokens = torch.cat((_fill(corpus, rng, lead, split), example.tokens, _fill(corpus, rng, room - hay - lead, split)))
    return tokens, span_weights(length, context_weight, lead + example.answer_start, lead + example.answer_end,
                                answer_weight)


def build_sequence(corpus: Corpus, tokenizer: Any, rng: np.random.Generator, length: int, cfg: DataConfig,
                   min_gap: int, split: str = "train") -> tuple[Tensor, Tensor]:
    """One training sequence, plain text or a synthetic long-range task chosen by the mix in `cfg`, and the
    loss weight of each token (1 in plain text; see `recall_weight`, `context_weight`, `noise_weight`)."""
    if rng.random() >= cfg.synthetic_fraction:
        return corpus.sample(rng, length, split), torch.ones(length)
    if 0 < cfg.task_span < length:  # the task at the start, plain text after it
        tokens, weights = _task(corpus, tokenizer, rng, cfg.task_span, cfg, min_gap, split)
        tail = length - cfg.task_span
        return torch.cat((tokens, corpus.sample(rng, tail, split))), torch.cat((weights, torch.ones(tail)))
    return _task(corpus, tokenizer, rng, length, cfg, min_gap, split)


def _task(corpus: Corpus, tokenizer: Any, rng: np.random.Generator, length: int, cfg: DataConfig,
          min_gap: int, split: str) -> tuple[Tensor, Tensor]:
    """A synthetic task of `length` tokens (pass key, noise repeat or repeat, by the mix in `cfg`) and its weights."""
    if rng.random() < cfg.passkey_share:
        return passkey_sequence(corpus, tokenizer, rng, length, split, cfg.recall_weight, cfg.context_weight)
    if cfg.noise_share > 0 and rng.random() < cfg.noise_share:
        return noise_repeat_sequence(corpus, rng, length, cfg, min_gap, split)
    return repeat_sequence(corpus, rng, length, cfg, min_gap, split)


class SequenceBatches:
    """Batch `index` = `batch_size` sequences of `length` tokens, each a function of (seed, id) only."""

    def __init__(self, corpus: Corpus, tokenizer: Any, cfg: DataConfig, batch_size: int, length: int,
                 min_gap: int, seed: int, split: str = "train", pieces: int = 1):
        self.corpus, self.tokenizer, self.cfg = corpus, tokenizer, cfg
        self.batch_size, self.length, self.min_gap, self.seed, self.split = batch_size, length, min_gap, seed, split
        self.pieces = pieces  # > 1: each sequence is that many independent sequences in a row

    def _sequence(self, index: int, row: int) -> tuple[Tensor, Tensor]:
        if self.pieces == 1:
            return build_sequence(self.corpus, self.tokenizer, np.random.default_rng([self.seed, index, row]),
                                  self.length, self.cfg, self.min_gap, self.split)
        size = self.length // self.pieces  # the last piece takes the remainder (the extra target token)
        sizes = [size] * (self.pieces - 1) + [self.length - size * (self.pieces - 1)]
        parts = [build_sequence(self.corpus, self.tokenizer, np.random.default_rng([self.seed, index, row, piece]),
                                n, self.cfg, self.min_gap, self.split) for piece, n in enumerate(sizes)]
        return torch.cat([t for t, _ in parts]), torch.cat([w for _, w in parts])

    def __getitem__(self, index: int) -> Tensor:
        return self.weighted(index)[0]

    def weighted(self, index: int) -> tuple[Tensor, Tensor]:
        """The batch's tokens (B, length) and their loss weights (B, length)."""
        rows = [self._sequence(index, row) for row in range(self.batch_size)]
        return torch.stack([t for t, _ in rows]), torch.stack([w for _, w in rows])
