"""Progress of a run: a rich bar (tokens, tokens/s, ETA, segments in flight) on a terminal, plain lines
every few seconds otherwise (logs, CI). Progress goes to stderr; stdout keeps the summary and text."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from titans_runtime.runtime.metrics import TokenRate

PLAIN_EVERY_S = 5.0


class ProgressReporter:
    def __init__(self, total_tokens: int | None, stream: TextIO | None = None, live: bool | None = None,
                 enabled: bool = True):
        self.stream = stream or sys.stderr
        self.total = total_tokens
        self.enabled = enabled
        self.live = self.stream.isatty() if live is None else live
        self.tokens = 0
        self.in_flight = 0
        self.started = time.monotonic()
        self.rate = TokenRate()
        self._last_plain = self.started
        self._progress = None
        if self.enabled and self.live:
            from rich.console import Console
            from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]streaming"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.completed:,.0f}/{task.fields[total_text]} tok"),
                TextColumn("{task.fields[rate]:,.0f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), TextColumn("in flight {task.fields[in_flight]}"),
                console=Console(file=self.stream), transient=False,
            )
            self._task = self._progress.add_task(
                "run", total=total_tokens, rate=0.0, in_flight=0,
                total_text=f"{total_tokens:,}" if total_tokens else "?")
            self._progress.start()

    def update(self, tokens: int, in_flight: int) -> None:
        self.tokens += tokens
        self.in_flight = in_flight
        self.rate.add(tokens)
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=self.tokens, rate=self.rate.rate(), in_flight=in_flight)
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = now
            print(self.plain_line(now), file=self.stream, flush=True)

    def plain_line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.started
        mean_rate = self.tokens / elapsed if elapsed > 0 else 0.0
        if self.total:
            parts = [f"progress: {self.tokens:,}/{self.total:,} tokens ({100.0 * self.tokens / self.total:.1f}%)"]
        else:
            parts = [f"progress: {self.tokens:,} tokens"]
        parts.append(f"{self.rate.rate():,.0f} tok/s")
        if self.total and mean_rate > 0:
            parts.append(f"ETA {max(self.total - self.tokens, 0) / mean_rate:,.0f} s")
        parts.append(f"in flight {self.in_flight}")
        return ", ".join(parts)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
