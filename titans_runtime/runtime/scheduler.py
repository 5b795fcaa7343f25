"""The driver-side scheduler: which segment of which stream goes next.

- Each stream is read lazily through its `segments()` iterator, one segment of look-ahead (the next
  segment's first token is the target of this segment's last position).
- A stream has at most one segment in flight (its state after segment n is the input of n+1), so the
  pipeline overlaps *different* streams: at most `max_in_flight` streams are active at once (which
  also bounds the per-stream state the stages hold); a finished stream makes room for the next.
- After a crash a stream rewinds to its last snapshot (or its start) and replays; results already
  delivered are recognised by seq_no and not delivered twice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch

from titans_runtime.runtime.stages import NO_TARGET


class SegmentSource(Protocol):
    """What the pipeline needs from a stream (TextStream provides it)."""

    stream_id: str

    def segments(self, start: Any = None) -> Iterator[Any]: ...


@dataclass
class Work:
    """One segment ready to submit."""

    stream: int            # index of the stream in the run
    stream_id: str
    seq_no: int
    token_start: int
    token_end: int
    position: int          # model position of the first token (resume base + token_start)
    tokens: torch.Tensor   # (T,)
    targets: torch.Tensor  # (T,) next tokens, NO_TARGET where the stream ends
    cursor_after: Any
    is_last: bool


@dataclass
class StreamProgress:
    index: int
    source: SegmentSource
    base_position: int = 0            # model position of the stream's token 0 (a resumed state's position)
    delivered: int = 0                # results with seq_no < delivered were handed out already
    in_flight: bool = False
    finished: bool = False
    _iter: Iterator[Any] | None = None
    _ahead: Any = None
    _exhausted: bool = False

    def start(self, cursor: Any = None) -> None:
        self._iter = self.source.segments(cursor) if cursor is not None else self.source.segments()
        self._ahead = next(self._iter, None)
        self._exhausted = self._ahead is None
        self.finished = self._exhausted

    def has_next(self) -> bool:
        return self._ahead is not None

    def take(self) -> Work:
        seg = self._ahead
        self._ahead = next(self._iter, None)
        tokens = seg.tokens.to(torch.int64)
        targets = torch.full_like(tokens, NO_TARGET)
        targets[:-1] = tokens[1:]
        if self._ahead is not None and len(self._ahead.tokens):
            targets[-1] = self._ahead.tokens[0]
        return Work(self.index, self.source.stream_id, seg.seq_no, seg.token_start, seg.token_end,
                    self.base_position + seg.token_start, tokens, targets, seg.cursor_after, self._ahead is None)


class Scheduler:
    """Active streams (at most max_in_flight), one segment per stream in flight."""

    def __init__(self, sources: list[SegmentSource], max_in_flight: int, base_positions: list[int]):
        self.streams = [StreamProgress(i, s, base_positions[i]) for i, s in enumerate(sources)]
        self.max_in_flight = max_in_flight
        self.waiting = list(range(len(sources)))  # not started yet, in order
        self.active: list[int] = []
        self._rr = 0

    def activate(self) -> list[int]:
        """Start waiting streams while there is room; returns the newly started ones."""
        started = []
        while self.waiting and len(self.active) < self.max_in_flight:
            i = self.waiting.pop(0)
            self.streams[i].start()
            if self.streams[i].finished:  # a stream with no tokens
                continue
            self.active.append(i)
            started.append(i)
        return started

    def next_work(self) -> Work | None:
        """A segment of an active stream that has none in flight (round robin), or None."""
        n = len(self.active)
        for k in range(n):
            i = self.active[(self._rr + k) % n]
            progress = self.streams[i]
            if not progress.in_flight and progress.has_next():
                self._rr = (self._rr + k + 1) % n
                progress.in_flight = True
                return progress.take()
        return None

    def complete(self, work: Work) -> bool:
        """Mark a segment done; True if the result is new (not a replay of a delivered one)."""
        progress = self.streams[work.stream]
        progress.in_flight = False
        fresh = work.seq_no >= progress.delivered
        if fresh:
            progress.delivered = work.seq_no + 1
        if work.is_last:
            progress.finished = True
            self.active.remove(work.stream)
        return fresh

    def rewind(self, stream: int, cursor: Any = None) -> None:
        """Restart an active stream from a cursor (None: from its beginning)."""
        progress = self.streams[stream]
        progress.in_flight = False
        progress.start(cursor)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.active
