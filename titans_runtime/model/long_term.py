"""The long-term memory component: every memory layer's LMM and the per-stream state of each."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from titans_runtime.config import TitansConfig
from titans_runtime.model.neural_memory import MemoryState, NeuralMemory

LongTermState = dict[str, MemoryState]  # layer index (as str) -> that layer's memory state


class LongTermMemory(nn.Module):
    def __init__(self, cfg: TitansConfig):
        super().__init__()
        segment = cfg.attention.segment_len if cfg.variant == "mac" else None
        self.layer_ids = cfg.memory_layers
        self.memories = nn.ModuleDict({str(i): NeuralMemory(cfg.model.dim, cfg.memory, segment) for i in self.layer_ids})

    def initial_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> LongTermState:
        return {name: mem.initial_state(batch, device, dtype) for name, mem in self.memories.items()}

    def retrieve(self, layer: int, x: Tensor, state: LongTermState) -> Tensor:
        """MAC read for `layer`; updates `state[layer]` in place (the segment snapshot)."""
        out, state[str(layer)] = self.memories[str(layer)].retrieve(x, state[str(layer)])
        return out

    def update_and_retrieve(self, layer: int, x: Tensor, state: LongTermState, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Write and read `layer`'s memory; updates `state[layer]` in place. Returns (output, surprise)."""
        out, surprise, state[str(layer)] = self.memories[str(layer)].update_and_retrieve(x, state[str(layer)], valid)
        return out, surprise


class LocalMemoryPort:
    """MemoryPort for a LongTermMemory in this process; collects surprise per memory layer."""

    def __init__(self, memory: LongTermMemory, state: LongTermState, valid: Tensor | None = None):
        self.memory = memory
        self.state = state
        self.valid = valid
        self.surprise: dict[int, Tensor] = {}

    def retrieve(self, layer: int, x: Tensor) -> Tensor:
        return self.memory.retrieve(layer, x, self.state)

    def update_and_retrieve(self, layer: int, x: Tensor) -> Callable[[], Tensor]:
        out, self.surprise[layer] = self.memory.update_and_retrieve(layer, x, self.state, self.valid)
        return lambda: out
