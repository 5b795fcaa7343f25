"""The end-of-run summary: per stream (tokens, segments, mean loss, bits/token) and per stage (busy
fraction, peak memory vs the plan). Accumulates constant-size totals, never the per-segment results."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.table import Table

GB = 1024 ** 3


@dataclass
class StreamTotals:
    tokens: int = 0
    segments: int = 0
    loss_sum: float = 0.0      # sum over predicted tokens of their loss (nats)
    predicted: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.predicted if self.predicted else float("nan")


class RunSummary:
    def __init__(self, stream_ids: list[str] = ()) -> None:
        self.streams: dict[str, StreamTotals] = {sid: StreamTotals() for sid in stream_ids}  # table order

    def add(self, result) -> None:
        totals = self.streams.setdefault(result.stream, StreamTotals())
        totals.tokens += result.token_end - result.token_start
        totals.segments += 1
        if result.n_predicted:
            totals.loss_sum += result.loss * result.n_predicted
            totals.predicted += result.n_predicted

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.streams.values())

    def stream_table(self) -> Table:
        table = Table(title="streams")
        for col in ("stream", "tokens", "segments", "mean loss (nats)", "bits/token"):
            table.add_column(col, justify="left" if col == "stream" else "right")
        for name, t in self.streams.items():
            table.add_row(name, f"{t.tokens:,}", f"{t.segments:,}", _num(t.mean_loss), _num(t.mean_loss / math.log(2)))
        return table

    @staticmethod
    def stage_table(stage_stats: dict[str, dict], planned: dict[str, tuple[int, int]]) -> Table:
        """planned: stage -> (planned bytes, budget bytes) from the planner."""
        table = Table(title="stages")
        for col in ("stage", "segments", "busy", "memory now", "peak memory", "planned", "budget"):
            table.add_column(col, justify="left" if col == "stage" else "right")
        for stage, s in stage_stats.items():
            wall = s.get("wall_s") or 0.0
            plan_bytes, budget = planned.get(stage, (None, None))
            table.add_row(stage, f"{s.get('segments', 0):,}",
                          f"{100.0 * s.get('busy_s', 0.0) / wall:.0f}%" if wall > 0 else "-",
                          _gb(s.get("memory_bytes")), _gb(s.get("peak_bytes")), _gb(plan_bytes),
                          _gb(s.get("budget_bytes") or budget))
        return table

    def print(self, out: TextIO, stage_stats: dict[str, dict], planned: dict[str, tuple[int, int]],
              wall_s: float, startup_s: float | None = None) -> None:
        console = Console(file=out, width=None if out.isatty() else 120)
        console.print(self.stream_table())
        console.print(self.stage_table(stage_stats, planned))
        rate = self.tokens / wall_s if wall_s > 0 else 0.0
        startup = f"; start-up {startup_s:.1f} s" if startup_s is not None else ""
        console.print(f"{self.tokens:,} tokens in {wall_s:.1f} s ({rate:,.0f} tokens/s){startup}")


def _num(x: float) -> str:
    return "-" if x != x else f"{x:.4f}"


def _gb(n: int | None) -> str:
    return "-" if not n else f"{n / GB:.3f} GB"
