"""Which training sequence (and which of its TBPTT windows) each optimiser step reads.

Two kinds of sequence: the configured mix (`windows_per_sequence` windows long) and, when
`long_text_share` > 0, plain-text streams of `long_text_windows` windows. The long streams teach the
model to read a memory that has been written for thousands of tokens (evaluation streams are longer
than a training window); the short ones keep every synthetic task starting from a fresh state, as the
recall evaluations do. Each kind numbers its own sequences, so with no long streams the plan is the
plain step -> (step // windows, step % windows) of before.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

MIXED, LONG_TEXT = "mixed", "long_text"


@dataclass(frozen=True)
class PlannedWindow:
    kind: str        # MIXED or LONG_TEXT
    index: int       # the sequence's number among its kind (its batch index)
    window: int      # this step's window within the sequence
    windows: int     # the sequence's windows: the state resets after the last


class StreamPlan:
    """A pure function of (seed, step), so a resumed run reads exactly what an uninterrupted one would."""

    def __init__(self, windows_per_sequence: int, long_text_windows: int, long_text_share: float, seed: int):
        self.windows = windows_per_sequence
        self.long_windows = long_text_windows
        self.share = long_text_share if long_text_windows > 0 else 0.0
        self.seed = seed
        self._starts: list[int] = [0]              # first step of each planned sequence
        self._sequences: list[tuple[str, int, int]] = []  # (kind, index, windows)
        self._counts = {MIXED: 0, LONG_TEXT: 0}

    def _kind(self, sequence: int) -> str:
        if self.share <= 0.0:
            return MIXED
        return LONG_TEXT if np.random.default_rng([self.seed, 7, sequence]).random() < self.share else MIXED

    def _extend(self) -> None:
        kind = self._kind(len(self._sequences))
        windows = self.long_windows if kind == LONG_TEXT else self.windows
        self._sequences.append((kind, self._counts[kind], windows))
        self._counts[kind] += 1
        self._starts.append(self._starts[-1] + windows)

    def at(self, step: int) -> PlannedWindow:
        if self.share <= 0.0:  # the common case, without a table
            index, window = divmod(step, self.windows)
            return PlannedWindow(MIXED, index, window, self.windows)
        while self._starts[-1] <= step:
            self._extend()
        sequence = bisect.bisect_right(self._starts, step) - 1  # (no array copy of the table per step)
        kind, index, windows = self._sequences[sequence]
        return PlannedWindow(kind, index, step - self._starts[sequence], windows)
