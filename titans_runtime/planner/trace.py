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


def _build(cls: type, cfg: TitansConfig) -> torch.nn.Module:
    """cls(cfg) with parameters created in the model dtype (what TitanModel(cfg).to(dtype) holds),
    without the float32 copies a later .to() would make."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(_model_dtype(cfg))
    try:
        return cls(cfg)
    finally:
        torch.set_default_dtype(previous)


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
        core = _build(Core, cfg)
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
            state = core.initial_state(1, dtype=dtype)
            if cfg.variant != "mac":  # a stream past its first segment: the window cache is full
                state = {k: torch.empty(*v.shape[:2], cfg.attention.window - 1, v.shape[3], dtype=dtype)
                         for k, v in state.items()}
            _, _, state = core(_tokens(seg), seg, state, port, persistent)
        others = [_copy_state(state) for _ in range(streams - 1)]
        port.received.clear()
        trace.reset_peak()
        resident = trace.live
        with torch.set_grad_enabled(train):
            if n_tokens and train:
                bank = torch.empty(bank_shape, dtype=dtype, requires_grad=True)  # received from the persistent stage
                persistent = core.persistent_kv(bank)
            hidden, knowledge, new_state = core(_tokens(seg), 2 * seg, state, port, persistent)
            if train:
                hidden.backward(torch.empty_like(hidden))  # the gradient arrives from the persistent stage
        del hidden, knowledge, new_state, others, optimizer_state
        return StageTrace(resident, trace.peak)


def _run_memory_segment(memory: LongTermMemory, cfg: TitansConfig, state: dict, train: bool) -> tuple[list[Tensor], list[Tensor]]:
    """One segment through every memory layer, each input arriving as a fresh message from the core."""
    seg, dim, dtype = cfg.attention.segment_len, cfg.model.dim, _model_dtype(cfg)
    outputs, inputs = [], []

    def message() -> Tensor:
        t = torch.empty(1, seg, dim, dtype=dtype, requires_grad=train)
        if train:
            inputs.append(t)
        return t

    for layer in memory.layer_ids:
        if cfg.variant == "mac":
            h = memory.retrieve(layer, message(), state)
            if train:
                outputs.append(h)
            del h  # sent back to the core
        out, surprise = memory.update_and_retrieve(layer, message(), state)
        if train:
            outputs.append(out)
        del out, surprise
    return outputs, inputs


def trace_long_term_memory(cfg: TitansConfig, streams: int, train: bool = False) -> StageTrace:
    """Long-term memory stage: LMM weights, every stream's fast weights/momentum/conv tails, one segment."""
    dtype = _model_dtype(cfg)
    with FakeTrace() as trace:
        memory = _build(LongTermMemory, cfg)
        optimizer_state = _trainable(memory, train)
        with torch.no_grad():
            # A stream past its first segment: its fast weights have their own storage (not the parameters').
            state = {layer: {k: (v.clone() if k[0] in "ws" and k[1:].isdigit() else v) for k, v in st.items()}
                     for layer, st in memory.initial_state(1, dtype=dtype).items()}
            _run_memory_segment(memory, cfg, state, False)
        others = [_copy_state(state) for _ in range(streams - 1)]
        trace.reset_peak()
        resident = trace.live
        with torch.set_grad_enabled(train):
            if train:  # the segment's state starts from the learned initial weights' graph
                state = {k: {**v, **{n: w for n, w in memory.memories[k].initial_state(1, dtype=dtype).items()
                                       if n.startswith("w")}} for k, v in state.items()}
            outputs, inputs = _run_memory_segment(memory, cfg, state, train)
            if train:
                torch.autograd.backward(outputs, [torch.empty_like(o) for o in outputs])
        del outputs, inputs, others, optimizer_state, state
        return StageTrace(resident, trace.peak)


def persistent_stage_step(persistent: PersistentMemory, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """What the persistent stage computes per segment: logits, per-token loss in fp32, a sampled token."""
    logits = persistent.head(hidden)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    probs = torch.softmax(logits[:, -1].float(), dim=-1)
    return loss, torch.multinomial(probs, 1)


def trace_persistent_memory(cfg: TitansConfig, streams: int, train: bool = False) -> StageTrace:
    """Persistent memory stage: task banks, final norm and LM head, one segment's logits and loss."""
    seg, dim, dtype = cfg.attention.segment_len, cfg.model.dim, _model_dtype(cfg)
    with FakeTrace() as trace:
        persistent = _build(PersistentMemory, cfg)
        optimizer_state = _trainable(persistent, train)
        trace.reset_peak()
        resident = trace.live
        with torch.set_grad_enabled(train):
            hidden = torch.empty(1, seg, dim, dtype=dtype, requires_grad=train)  # received from the core
            loss, token = persistent_stage_step(persistent, hidden, _tokens(seg))
            if train:
                loss.mean().backward()
        del hidden, loss, token, optimizer_state
        return StageTrace(resident, trace.peak)


TRACERS = {"core": trace_core, "long_term_memory": trace_long_term_memory, "persistent_memory": trace_persistent_memory}


def layer_groups(cfg: TitansConfig) -> tuple[int, int, int] | None:
    """(groups, period, offset) when the layers repeat as identical groups of `period` layers with one
    memory layer at `offset` (LLaMA-7B configs: 8 groups of 4); None otherwise."""
    layers, n = cfg.memory_layers, cfg.model.n_layers
    if len(layers) < 2:
        return None
    offset, period = layers[0], layers[1] - layers[0]
    if period < 1 or n % period or layers != list(range(offset, n, period)):
        return None
    return n // period, period, offset


def _with_groups(cfg: TitansConfig, groups: int, period: int, offset: int) -> TitansConfig:
    return cfg.replace(**{"model.n_layers": groups * period, "memory.layers": list(range(offset, groups * period, period))})


def traced_peak(cfg: TitansConfig, stage: str, streams: int, train: bool = False, scale: bool = True) -> StageTrace:
    """The stage's traced resident and peak bytes. With scale, a model of G identical layer groups is
    traced with 1 and 2 groups and extrapolated linearly (resident, new state, saved activations and
    gradients grow by one group's bytes per group; the transient of the busiest layer does not), which
    makes a 32-layer trace cost as much as an 8-layer one. The persistent stage is always traced whole."""
    groups = layer_groups(cfg) if scale and stage != "persistent_memory" else None
    if groups is None or groups[0] < 3:
        return TRACERS[stage](cfg, streams, train)
    n, period, offset = groups
    one = TRACERS[stage](_with_groups(cfg, 1, period, offset), streams, train)
    two = TRACERS[stage](_with_groups(cfg, 2, period, offset), streams, train)
    return StageTrace(resident=one.resident + (n - 1) * (two.resident - one.resident),
                      peak=one.peak + (n - 1) * (two.peak - one.peak))


def compare(config_path: str, streams: int = 2, train: bool = False, segment_len: int | None = None) -> list[dict]:
    """Planned tensor bytes vs traced peak per stage (one segment in flight), as rows."""
    import time

    from titans_runtime.config import load_config
    from titans_runtime.planner.hardware import load_hardware
    from titans_runtime.planner.plan import plan_memory

    cfg = load_config(config_path)
    if segment_len is not None:
        cfg = cfg.replace(**{"attention.segment_len": segment_len})
    plan = plan_memory(cfg, load_hardware(None), streams, train=train, in_flight=1, search=False)
    rows = []
    for stage in STAGES:
        start = time.perf_counter()
        traced = traced_peak(cfg, stage, streams, train)
        planned = plan.stages[stage].tensor_bytes
        rows.append({"stage": stage, "planned": planned, "traced": traced.peak,
                     "error": planned / traced.peak - 1, "seconds": time.perf_counter() - start})
    return rows


def main(argv: list[str] | None = None) -> int:
    """python -m titans_runtime.planner.trace --config MODEL.yaml [--streams N] [--train] [--segment-len N]"""
    import argparse

    parser = argparse.ArgumentParser(description="planned vs traced peak bytes per stage (fake tensors)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--segment-len", type=int, default=None)
    parser.add_argument("--train", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for row in compare(args.config, args.streams, args.train, args.segment_len):
        print(f"{row['stage']:18s} planned {row['planned'] / 2**30:8.3f} GiB  traced {row['traced'] / 2**30:8.3f} GiB"
              f"  error {100 * row['error']:+6.2f}%  ({row['seconds']:.1f} s to trace)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
