"""Text generation that continues a memorised stream.

The prompt is fed through the model carrying the stream's state (so the long-term memory keeps learning
from it), then tokens are sampled one at a time, each fed back with the state. The returned state has
consumed the prompt and every generated token: it continues the stream exactly as if that text had been
part of it. Sampling uses its own seeded generator, so a seed gives the same text every time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from titans_runtime.errors import InputError
from titans_runtime.model.state import StreamState


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One token id from (vocab,) logits: argmax when temperature is 0, else softmax(logits / T)
    restricted to the top_k largest logits (all when None)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.detach().to(torch.float64) / temperature
    if top_k is not None and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _check(model, state: StreamState, prompt_ids: list[int], n_tokens: int, temperature: float,
           top_k: int | None) -> None:
    if len(prompt_ids) == 0:
        raise InputError("generation needs a prompt of at least one token")
    vocab = model.config.model.vocab_size
    bad = [i for i in prompt_ids if not 0 <= int(i) < vocab]
    if bad:
        raise InputError(f"prompt token id {bad[0]} outside the vocabulary 0..{vocab - 1}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise InputError(f"number of tokens to generate must be an integer >= 0, got {n_tokens!r}")
    if not temperature >= 0:
        raise InputError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise InputError(f"top-k must be a positive integer (or none), got {top_k!r}")
    if state is not None and state.batch_size != 1:
        raise InputError(f"generation continues one stream; the state holds {state.batch_size}")


def generate(model, state: StreamState | None, prompt_ids: list[int], n_tokens: int, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0, task_id: int = 0) -> tuple[list[int], StreamState]:
    """Continue the stream held in `state` (None: a fresh stream) with `prompt_ids`, then sample
    `n_tokens` tokens. Returns (generated ids, state after the prompt and the generated tokens).
    temperature 0 = greedy. Deterministic for a given seed."""
    _check(model, state, prompt_ids, n_tokens, temperature, top_k)
    if state is None:
        state = model.initial_state(1)
    device = model.device
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    generated: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([list(prompt_ids)], dtype=torch.long, device=device), task_ids=task_id, state=state)
        state = out.state
        for step in range(n_tokens):
            token = sample_next(out.logits[0, -1], temperature, top_k, generator)
            generated.append(token)
            # Feed the token back so the state continues the stream (the last one too, hence no early exit).
            out = model(torch.tensor([[token]], dtype=torch.long, device=device), task_ids=task_id, state=state)
            state = out.state
    return generated, state
