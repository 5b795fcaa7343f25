"""The single-process runner: the Pipeline's `run / final_states / stage_stats / in_flight` interface over
one in-process TitanModel (lazy, unlike runtime.reference.reference_run, which returns lists for tests).
`titans-run --single-process` uses it (no Ray), and the benchmarks time the pipeline against it."""
from __future__ import annotations

import math
import time
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import TitanModel
from titans_runtime.runtime.metrics import rss_bytes
from titans_runtime.runtime.pipeline import SegmentResult
from titans_runtime.runtime.reference import memory_reset_at

STAGE = "single_process"


def _with_next(segments: Iterable) -> Iterator[tuple[object, object | None]]:
    """Pairs (segment, next segment or None): a segment's last token is scored against the next's first."""
    it = iter(segments)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        yield current, following
        current = following


class SingleProcessRunner:
    """Streams one after another through one TitanModel, segment by segment, carrying each stream's state."""

    def __init__(self, model: TitanModel, memory_off: bool = False, task_id: int = 0):
        self.model = model.eval()
        self.memory_off = memory_off
        self.task_id = task_id
        self.in_flight = 0
        self._states: dict[str, StreamState] = {}
        self._busy_s = 0.0
        self._started = time.perf_counter()
        self._segments = 0
        self._peak_rss = 0

    def __enter__(self) -> "SingleProcessRunner":
        return self

    def __exit__(self, *exc) -> None:
        return None

    @torch.no_grad()
    def run(self, streams: list, resume: dict[str, StreamState] | None = None) -> Iterator[SegmentResult]:
        self._started = time.perf_counter()
        for stream in streams:
            state = (resume or {}).get(stream.stream_id) or self.model.initial_state(1)
            for segment, following in _with_next(stream.segments()):
                self.in_flight = 1
                t0 = time.perf_counter()
                if self.memory_off:
                    state = StreamState(state.position, state.core, memory_reset_at(
                        self.model.memory, state.position, self.model.config.variant, self.model.device,
                        self.model.dtype))
                tokens = segment.tokens.view(1, -1)
                out = self.model(tokens, task_ids=self.task_id, state=state)
                state = out.state
                targets = tokens[0, 1:]
                if following is not None:
                    targets = torch.cat([targets, following.tokens[:1]])
                n = targets.numel()
                logits = out.logits[0, :n]
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # as the pipeline's loss
                loss = float(F.cross_entropy(logits, targets, reduction="sum")) / n if n else math.nan
                ms = (time.perf_counter() - t0) * 1000.0
                self._busy_s += ms / 1000.0
                self._segments += 1
                self._peak_rss = max(self._peak_rss, rss_bytes())
                self.in_flight = 0
                yield SegmentResult(
                    stream=stream.stream_id, seq_no=segment.seq_no, token_start=segment.token_start,
                    token_end=segment.token_end, loss=loss, bits_per_token=loss / math.log(2),
                    surprise=[float(x) for x in out.surprise[0].mean(0)] if out.surprise.shape[-1] else [],
                    knowledge_attention=float(out.knowledge.mean()),
                    stage_ms={STAGE: ms}, n_predicted=n,
                )
            self._states[stream.stream_id] = state

    def final_states(self) -> dict[str, StreamState]:
        return dict(self._states)

    def stage_stats(self) -> dict[str, dict]:
        return {STAGE: {"busy_s": self._busy_s, "wall_s": time.perf_counter() - self._started,
                        "memory_bytes": rss_bytes(), "peak_bytes": self._peak_rss, "budget_bytes": None,
                        "segments": self._segments}}
