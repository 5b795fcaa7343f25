"""Does the long-term memory work? Three evaluations, each run with the memory on and off.

"Memory off" resets every memory layer's state (fast weights, momentum, conv tails) at the start of
every attention segment, so nothing reaches further back than the attention window.

- repeat_after_gap: lead text, passage A, filler of >= 8x the window, A again. Ratio = mean loss on the
  second A / mean loss on the first A (first token of A excluded: it is not predictable from A).
- passkey: "The pass key is 12345. Remember it. ..." stated once at the start of a haystack of n x the
  window, then "What is the pass key? The pass key is " -> correct when the greedy prediction of every
  answer token is right (teacher forcing on the answer prefix = greedy decoding of the answer).
- bits_per_byte: next-token loss on held-out text, in bits per byte of UTF-8 text.

Both recall evaluations can start from a warm memory (`warm` tokens of other held-out text first): in a long
stream a fact arrives when the memory already holds a lot, not into an empty one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import TitanModel
from titans_runtime.training.data import Corpus, passkey_example, random_key


def eval_segment_len(model: TitanModel) -> int:
    return model.config.attention.segment_len


def window_len(model: TitanModel) -> int:
    """The reach of the attention (MAC: its segment, MAG/MAL: its sliding window)."""
    cfg = model.config
    return cfg.attention.segment_len if cfg.variant == "mac" else cfg.attention.window


@torch.no_grad()
def stream_predictions(model: TitanModel, tokens: Tensor, memory: bool = True,
                       segment_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Read tokens (B, N) segment by segment carrying the state. Returns the next-token NLL (B, N-1)
    and the greedy prediction (B, N-1) at each position. memory=False resets the long-term memory at
    every segment."""
    model.eval()
    segment_len = segment_len or eval_segment_len(model)
    batch, n = tokens.shape
    state = model.initial_state(batch)
    nll, pred = [], []
    for start in range(0, n - 1, segment_len):
        end = min(n - 1, start + segment_len)
        if not memory:
            state = StreamState(state.position, state.core,
                                model.memory.initial_state(batch, model.device, model.dtype))
        out = model(tokens[:, start:end], state=state)
        state = out.state
        logits = out.logits.float()
        nll.append(F.cross_entropy(logits.transpose(1, 2), tokens[:, start + 1:end + 1], reduction="none"))
        pred.append(logits.argmax(-1))
    return torch.cat(nll, dim=1), torch.cat(pred, dim=1)


@dataclass
class RepeatResult:
    first: float    # mean NLL (nats/token) on the first reading of A
    second: float   # ... on the second reading, after the gap
    gap: int        # filler tokens between the two readings

    @property
    def ratio(self) -> float:
        return self.second / self.first


def repeat_batch(corpus: Corpus, rng: np.random.Generator, trials: int, passage: int, gap: int, lead: int,
                 split: str = "heldout") -> tuple[Tensor, int, int]:
    """(tokens (trials, lead + 2 * passage + gap), start of the first A, start of the second A)."""
    rows = []
    for _ in range(trials):
        a = corpus.sample(rng, passage, split)
        rows.append(torch.cat((corpus.sample(rng, lead, split), a, corpus.sample(rng, gap, split), a)))
    return torch.stack(rows), lead, lead + passage + gap


def repeat_after_gap(model: TitanModel, tokens: Tensor, first: int, second: int, passage: int,
                     memory: bool = True) -> RepeatResult:
    nll, _ = stream_predictions(model, tokens, memory)
    # nll[:, i] is the loss of predicting token i + 1; skip A's first token (not predictable from A).
    first_loss = nll[:, first:first + passage - 1].mean()
    second_loss = nll[:, second:second + passage - 1].mean()
    return RepeatResult(float(first_loss), float(second_loss), second - first - passage)


@dataclass
class PassKeyResult:
    haystack: int          # haystack tokens
    accuracy: float        # all answer tokens right
    digit_accuracy: float  # share of answer tokens right
    trials: int


def passkey_batch(corpus: Corpus, tokenizer: Any, rng: np.random.Generator, trials: int, haystack: int,
                  split: str = "heldout", warm: int = 0) -> tuple[Tensor, int, int]:
    """(tokens (trials, warm + example), answer start, answer end): `warm` tokens of other text before
    each needle (0: the needle opens the stream, into an empty memory)."""
    examples = [passkey_example(tokenizer, random_key(rng), corpus.sample(rng, haystack, split)) for _ in range(trials)]
    lengths = {e.tokens.numel() for e in examples}
    if len(lengths) != 1:  # a subword tokenizer may split keys differently: keep the common shape
        raise ValueError("pass-key examples of one length must tokenize to the same length")
    rows = [torch.cat((corpus.sample(rng, warm, split), e.tokens)) if warm > 0 else e.tokens for e in examples]
    return torch.stack(rows), warm + examples[0].answer_start, warm + examples[0].answer_end


def passkey(model: TitanModel, tokens: Tensor, answer_start: int, answer_end: int, memory: bool = True) -> PassKeyResult:
    _, pred = stream_predictions(model, tokens, memory)
    # pred[:, i] predicts token i + 1.
    guess = pred[:, answer_start - 1:answer_end - 1]
    right = guess == tokens[:, answer_start:answer_end]
    hay = tokens.shape[1] - (answer_end - answer_start)
    return PassKeyResult(hay, float(right.all(-1).float().mean()), float(right.float().mean()), tokens.shape[0])


def text_batch(corpus: Corpus, rng: np.random.Generator, streams: int, length: int, split: str = "heldout") -> Tensor:
    return torch.stack([corpus.sample(rng, length, split) for _ in range(streams)])


def bits_per_byte(model: TitanModel, tokens: Tensor, tokenizer: Any, memory: bool = True) -> float:
    """Held-out bits per byte of `tokens` (B, N) read as one stream per row."""
    return nll_bits_per_byte(stream_predictions(model, tokens, memory)[0], tokens, tokenizer)


def nll_bits_per_byte(nll: Tensor, tokens: Tensor, tokenizer: Any) -> float:
    """Bits per byte from `tokens`' next-token NLL (B, N-1), as `stream_predictions` returns it."""
    from titans_runtime.model.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):  # one token per byte (decoding could alter cut characters)
        return float(nll.sum()) / math.log(2) / nll.numel()
    n_bytes = sum(len(tokenizer.decode(row[1:].tolist()).encode("utf-8")) for row in tokens)
    return float(nll.sum()) / math.log(2) / n_bytes


def check_position_cuts(cuts: list[int], predictions: int) -> None:
    """ValueError unless `cuts` increase inside 1..predictions-1 (see `bits_by_position`)."""
    edges = [0, *cuts, predictions]
    if any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"cuts must increase inside 1..{predictions - 1}, got {','.join(map(str, cuts))}")


def bits_by_position(nll: Tensor, cuts: list[int]) -> list[float]:
    """Mean bits per token of the next-token NLL (B, N-1) over stream positions cut at `cuts` (each in
    1..N-2, increasing): [0, cuts[0]), [cuts[0], cuts[1]), ..., [cuts[-1], N-1). Where along a stream a
    model gains or loses (a memory filling up, a window's worth of context)."""
    check_position_cuts(cuts, nll.shape[1])
    edges = [0, *cuts, nll.shape[1]]
    return [float(nll[:, a:b].mean()) / math.log(2) for a, b in zip(edges, edges[1:])]
