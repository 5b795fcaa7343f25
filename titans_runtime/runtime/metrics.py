"""Runtime metrics for the Ray dashboard / Prometheus (ray.util.metrics), recorded by the driver.

Ray exports metrics recorded in the driver process like those of actors (through the node's metrics
agent, as `ray_<name>` on the `--metrics-export-port` endpoint), so the driver, which sees every
segment result and polls the stages' statistics, is the one place that records them all."""
from __future__ import annotations

import os
import resource
import sys
import time
from collections import deque

METRIC_NAMES = (
    "titans_tokens_processed",        # counter (exported as ray_titans_tokens_processed_total)
    "titans_tokens_per_second",       # gauge, over the last RATE_WINDOW_S seconds
    "titans_segments_in_flight",      # gauge
    "titans_stage_busy_fraction",     # gauge per stage: busy time / wall time
    "titans_memory_surprise",         # gauge per memory layer: mean surprise of the latest segment
    "titans_stage_memory_bytes",      # gauge per stage: memory in use now
    "titans_stage_memory_budget_bytes",  # gauge per stage: the planned budget
    "titans_loss_bits_per_token",     # gauge: bits/token of the latest segment
)
RATE_WINDOW_S = 10.0


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (this one by default), from /proc; peak RSS where /proc is absent."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        if pid is not None:
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class TokenRate:
    """Tokens per second over a sliding time window."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self.created = time.monotonic()
        self.events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.events.append((now, tokens))
        while self.events and now - self.events[0][0] > self.window_s:
            self.events.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.events and now - self.events[0][0] > self.window_s:
            self.events.popleft()
        # the window reaches back window_s seconds (less at the start): tokens over that span
        span = max(min(self.window_s, now - self.created), 1e-3)
        return sum(t for _, t in self.events) / span


class RuntimeMetrics:
    """The runtime's dashboard metrics. Create after ray.init (in the driver)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.tokens = Counter("titans_tokens_processed", description="Tokens processed by the pipeline.")
        self.tokens_per_s = Gauge("titans_tokens_per_second", description="Tokens per second (last 10 s).")
        self.in_flight = Gauge("titans_segments_in_flight", description="Segments in flight in the pipeline.")
        self.busy = Gauge("titans_stage_busy_fraction", description="Fraction of wall time a stage computes.",
                          tag_keys=("stage",))
        self.surprise = Gauge("titans_memory_surprise",
                              description="Mean long-term-memory surprise of the latest segment.",
                              tag_keys=("layer",))
        self.memory = Gauge("titans_stage_memory_bytes", description="Memory a stage uses now.",
                            tag_keys=("stage",))
        self.budget = Gauge("titans_stage_memory_budget_bytes", description="A stage's memory budget (plan).",
                            tag_keys=("stage",))
        self.bits = Gauge("titans_loss_bits_per_token", description="Bits per token of the latest segment.")
        self.rate = TokenRate()

    def record_segment(self, result, memory_layers: list[int]) -> None:
        tokens = result.token_end - result.token_start
        self.tokens.inc(tokens)
        self.rate.add(tokens)
        self.tokens_per_s.set(self.rate.rate())
        if result.bits_per_token == result.bits_per_token:  # NaN for a stream's lone last token
            self.bits.set(result.bits_per_token)
        for layer, value in zip(memory_layers, result.surprise):
            self.surprise.set(value, tags={"layer": str(layer)})

    def record_pipeline(self, in_flight: int, stage_stats: dict[str, dict], budgets: dict[str, int]) -> None:
        self.in_flight.set(in_flight)
        for stage, stats in stage_stats.items():
            wall = stats.get("wall_s") or 0.0
            if wall > 0:
                self.busy.set(stats.get("busy_s", 0.0) / wall, tags={"stage": stage})
            if stats.get("memory_bytes") is not None:
                self.memory.set(stats["memory_bytes"], tags={"stage": stage})
            budget = stats.get("budget_bytes") or budgets.get(stage)
            if budget:
                self.budget.set(budget, tags={"stage": stage})
