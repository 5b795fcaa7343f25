"""Traced peaks of the real stage computations at any model size, on fake tensors (no real memory).

Each stage is built and run the way the runtime runs it (Core.forward with the long-term memory behind a
port whose answers arrive as fresh buffers; LongTermMemory.retrieve / update_and_retrieve per memory
layer; PersistentMemory.head plus the per-token loss and sampling), with the per-stream state of every
concurrent stream resident. The planner's numbers are checked against these peaks in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from titans_runtime.config import TitansConfig
from titans_runtime.model.core import Core
from titans_runtime.model.long_term import LongTermMemory
from titans_runtime.model.persistent import PersistentMemory
from titans_runtime.model.titans import DTYPES
from titans_runtime.planner.tracer import FakeTrace

STAGES = ("core", "long_term_memory", "persistent_memory")


@dataclass
class StageTrace:
    resident: int   # bytes live before the segment runs (weights, optimizer state, stream states, caches)
    peak: int       # the highest live bytes while the segment runs (forward, and backward when training)


def _like_storage(t: Tensor) -> Tensor:
    """A tensor with t's shape, strides and dtype over a fresh storage as large as t's (views keep
    their whole base alive, so another stream's state costs the storage, not the view)."""
    base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def _copy_state(state: dict) -> dict:
    return {k: (_copy_state(v) if isinstance(v, dict) else _like_storage(v)) for k, v in state.items()}


def _model_dtype(cfg: TitansConfig) -> torch.dtype:
    return DTYPES[cfg.dtype]


def _trainable(module: torch.nn.Module, train: bool) -> list[Tensor]:
    """Gradients on when training; AdamW's two moments per trainable parameter become resident."""
    module.requires_grad_(train)
    if not train:
        return []
    return [torch.zeros_like(p) for p in module.parameters() for _ in range(2)]


class _ReceivingPort:
    """The core's view of the long-term memory in another process: every answer is a fresh buffer the
    size of one hidden-state message (a leaf that collects its gradient when training)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, train: bool):
        self.shape, self.dtype, self.train = shape, dtype, train
        self.received: list[Tensor] = []

    def _message(self) -> Tensor:
        t = torch.empty(self.shape, dtype=self.dtype, requires_grad=self.train)
        if self.train:
            self.received.append(t)
        return t

    def retrieve(self, layer: int, x: Tensor) -> Tensor:
        return self._message()

    def update_and_retrieve(self, layer: int, x: Tensor) -> Callable[[], Tensor]:
        out = self._message()
        return lambda: out


def _tokens(segment_len: int) -> Tensor:
    return torch.zeros(1, segment_len, dtype=torch.long)


def trace_core(cfg: TitansConfig, streams: int, train: bool = False) -> StageTrace:
    """Core stage: weights, persistent K/V per active task, every stream's attention cache, one segment."""
    seg = cfg.attention.segment_len
    dim, dtype = cfg.model.dim, _model_dtype(cfg)
    with FakeTrace() as trace:
        core = Core(cfg).to(dtype)
        optimizer_state = _trainable(core, train)
        n_tokens = cfg.persistent.n_tokens if cfg.variant != "lmm" else 0
        bank_shape = (1, cfg.model.n_layers, n_tokens, dim)
        persistent = None
        if n_tokens and not train:
            with torch.no_grad():
                for task in range(min(streams, cfg.persistent.n_tasks)):
                    persistent = core.persistent_kv(torch.empty(bank_shape, dtype=dtype), (task,))
        port = _ReceivingPort((1, seg, dim), dtype, train)
        # Stream 0 runs its first segment so its state holds exactly what the code keeps; the other
        # streams hold states of the same storage sizes.
        with torch.no_grad():
            _, _, state = core(_tokens(seg), 0, core.initial_state(1, dtype=dtype), port, persistent)
        others = [_copy_state(state) for _ in range(streams - 1)]
        port.received.clear()
        trace.reset_peak()
        resident = trace.live
        with torch.set_grad_enabled(train):
            if n_tokens and train:
                bank = torch.empty(bank_shape, dtype=dtype, requires_grad=True)  # received from the persistent stage
                persistent = core.persistent_kv(bank)
            hidden, knowledge, new_state = core(_tokens(seg), seg, state, port, persistent)
            if train:
                hidden.backward(torch.empty_like(hidden))  # the gradient arrives from the persistent stage
        del hidden, knowledge, new_state, others, optimizer_state
        return StageTrace(resident, trace.peak)
