"""The three stage actors. Each owns one component of the model (the very modules TitanModel uses) and
the per-stream state of that component:

- CoreStage (rank 0): Core (embeddings, attention, feed-forward) and each stream's attention caches.
  At memory layers it reaches the long-term memory through `RemoteMemoryPort` (send x, receive the
  result), the same MemoryPort interface TitanModel uses in-process.
- LongTermMemoryStage (rank 1): LongTermMemory and each stream's fast weights and momentum; serves
  the core's reads and writes and collects surprise.
- PersistentMemoryStage (rank 2): the task banks, final norm and LM head: logits, loss, per segment.

The driver calls `process(...)` on all three for a segment, with the same (slot, stream, seq_no,
position, length); all three derive the same message schedule from the config, so only tensors move
over torch.distributed. Each in-flight slot runs in its own actor thread (threaded Ray actors), so
segments of different streams overlap inside every stage. Plain classes: pipeline.py wraps them with
ray.remote."""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from titans_runtime.config import TitansConfig, config_from_dict
from titans_runtime.model.core import Core
from titans_runtime.model.long_term import LongTermMemory
from titans_runtime.model.persistent import PersistentMemory
from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import DTYPES, segment_pieces
from titans_runtime.runtime.reference import memory_reset_at
from titans_runtime.runtime.transport import (
    KIND_BANK, KIND_HIDDEN, KIND_RETRIEVE, KIND_RETRIEVED, KIND_UPDATE, KIND_UPDATED, RANKS, Transport, free_port,
)

NO_TARGET = -1  # a position whose next token does not exist (end of the stream)

# Model state_dict prefix of each stage's component.
PREFIXES = {"core": "core.", "long_term_memory": "memory.", "persistent_memory": "persistent."}


def component_weights(state_dict: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
    prefix = PREFIXES[stage]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_component_weights(model_dir: str, stage: str) -> dict[str, Tensor]:
    """Read only this stage's tensors from a model folder's safetensors."""
    from safetensors import safe_open

    from titans_runtime.model.checkpoint import WEIGHTS_FILE

    prefix = PREFIXES[stage]
    out = {}
    with safe_open(str(Path(model_dir) / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix):
                out[key[len(prefix):]] = f.get_tensor(key)
    return out


def mac_segment(cfg: TitansConfig) -> int | None:
    return cfg.attention.segment_len if cfg.variant == "mac" else None


class Stage:
    """What every stage shares: building its module, the transport, busy-time and memory stats."""

    name = "stage"

    def __init__(self, config: dict, weights: dict[str, Tensor] | None, model_dir: str | None,
                 threads: int, budget_bytes: int | None = None):
        torch.set_num_threads(max(1, threads))
        self.cfg = config_from_dict(config)
        self.dtype = DTYPES[self.cfg.dtype]
        gpus = _ray_gpu_ids()
        self.device = torch.device("cuda", 0) if gpus and torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if budget_bytes:  # cap this process at its planned budget
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), self.device)
        if weights is None:
            weights = load_component_weights(model_dir, self.name)
        self.module = self.build(self.cfg).to(self.dtype)
        self.module.load_state_dict(weights, strict=True)
        self.module.to(self.device).eval()
        self.rank = RANKS[self.name]
        self.transport: Transport | None = None
        self.clock = ActivityClock()
        self._segments = 0
        self._started = time.perf_counter()

    def build(self, cfg: TitansConfig) -> torch.nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ control
    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in _ray_gpu_ids()], "device": str(self.device)}

    def connect(self, host: str, port: int, n_slots: int, backend: str, timeout_s: float, loopback: bool) -> bool:
        self.transport = Transport(self.rank, 3, host, port, n_slots, backend, timeout_s, self.device, loopback)
        return True

    def ping(self) -> bool:
        return True

    def free_port(self, host: str) -> int:
        """A free port on this node, for the group's rendezvous (rank 0 publishes it)."""
        return free_port(host)

    def stats(self) -> dict[str, Any]:
        out = {"busy_s": self.clock.busy_s(), "wall_s": time.perf_counter() - self._started, "segments": self._segments,
               "device": str(self.device), "pid": os.getpid()}
        if self.device.type == "cuda":
            out["memory_bytes"] = torch.cuda.memory_allocated(self.device)
            out["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        else:
            out["memory_bytes"] = _rss_bytes()
            out["peak_bytes"] = _peak_rss_bytes()
        return out

    def close(self) -> bool:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        return True

    def _finish(self, timer: "SegmentTimer") -> float:
        """End a segment's timing; returns its busy milliseconds."""
        busy = timer.finish()
        with self.clock.lock:
            self._segments += 1
        return busy * 1e3


class ActivityClock:
    """Busy seconds of a stage: time during which at least one segment thread computes (is not waiting
    for a message), so overlapping segments are not counted twice and busy_s <= wall time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0
        self.since = 0.0
        self.total = 0.0

    def start(self) -> None:
        with self.lock:
            if self.active == 0:
                self.since = time.perf_counter()
            self.active += 1

    def stop(self) -> None:
        with self.lock:
            self.active -= 1
            if self.active == 0:
                self.total += time.perf_counter() - self.since

    def busy_s(self) -> float:
        with self.lock:
            return self.total + (time.perf_counter() - self.since if self.active else 0.0)


class SegmentTimer:
    """One segment in one stage: its wall time minus its waits for messages."""

    def __init__(self, clock: ActivityClock):
        self.clock = clock
        self.t0 = time.perf_counter()
        self.wait_s = 0.0
        clock.start()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        t = time.perf_counter()
        self.clock.stop()
        try:
            yield
        finally:
            self.clock.start()
            self.wait_s += time.perf_counter() - t

    def finish(self) -> float:
        self.clock.stop()
        return time.perf_counter() - self.t0 - self.wait_s


class RemoteMemoryPort:
    """MemoryPort whose memory lives in the LongTermMemoryStage: x goes out, the result comes back."""

    def __init__(self, transport: Transport, slot: int, stream: int, seq_no: int, pending: list, timer: SegmentTimer):
        self.transport, self.slot, self.stream, self.seq_no = transport, slot, stream, seq_no
        self.pending = pending  # sends to wait for before the segment ends
        self.timer = timer

    def _exchange(self, layer: int, kind_out: int, kind_in: int, x: Tensor) -> Callable[[], Tensor]:
        dst = RANKS["long_term_memory"]
        self.pending.append(self.transport.send(self.slot, dst, (self.stream, self.seq_no, layer, kind_out), x))

        def result() -> Tensor:
            with self.timer.waiting():
                return self.transport.recv(self.slot, dst, (self.stream, self.seq_no, layer, kind_in), tuple(x.shape),
                                           x.dtype)

        return result

    def retrieve(self, layer: int, x: Tensor) -> Tensor:
        return self._exchange(layer, KIND_RETRIEVE, KIND_RETRIEVED, x)()

    def update_and_retrieve(self, layer: int, x: Tensor) -> Callable[[], Tensor]:
        # The memory computes while the core goes on (MAG overlaps its attention with it).
        return self._exchange(layer, KIND_UPDATE, KIND_UPDATED, x)


class CoreStage(Stage):
    name = "core"

    def build(self, cfg: TitansConfig) -> torch.nn.Module:
        self.states: dict[int, dict[str, Tensor]] = {}
        self.persistent: dict[int, list | None] = {}
        return Core(cfg)

    @torch.no_grad()
    def fetch_bank(self, task_id: int) -> bool:
        """Receive a task's persistent-token bank from the PersistentMemoryStage and cache its K/V."""
        if self.cfg.persistent.n_tokens == 0 or self.cfg.variant == "lmm":
            self.persistent[task_id] = None
            return True
        m = self.cfg.model
        shape = (1, m.n_layers, self.cfg.persistent.n_tokens, m.dim)
        bank = self.transport.recv(None, RANKS["persistent_memory"], (task_id, 0, 0, KIND_BANK), shape, self.dtype)
        self.persistent[task_id] = self.module.persistent_kv(bank.clone(), (task_id,))
        return True

    def set_state(self, stream: int, state: dict[str, Tensor] | str | None) -> bool:
        """Start `stream` from a state (tensors or a snapshot file), or fresh when None."""
        if state is None:
            self.states.pop(stream, None)
        elif isinstance(state, str):
            self.states[stream] = {k: v.to(self.device) for k, v in StreamState.load(state).core.items()}
        else:
            self.states[stream] = {k: v.to(self.device) for k, v in state.items()}
        return True

    def get_state(self, stream: int, drop: bool = False) -> dict[str, Tensor]:
        state = self.states.pop(stream) if drop else self.states[stream]
        return {k: v.detach().cpu() for k, v in state.items()}

    @torch.no_grad()
    def process(self, slot: int, stream: int, seq_no: int, position: int, tokens: Tensor, task_id: int,
                snapshot: str | None = None) -> dict[str, float]:
        timer = SegmentTimer(self.clock)
        state = self.states.get(stream)
        if state is None:
            state = self.module.initial_state(1, self.device, self.dtype)
        tokens = tokens.to(self.device)[None]
        pending: list = []
        port = RemoteMemoryPort(self.transport, slot, stream, seq_no, pending, timer)
        hidden, knowledge = [], []
        for start, end in segment_pieces(position, tokens.shape[1], mac_segment(self.cfg)):
            h, kn, state = self.module(tokens[:, start:end], position + start, state, port, self.persistent[task_id])
            hidden.append(h)
            knowledge.append(kn)
        hidden_all = torch.cat(hidden, dim=1)
        pending.append(self.transport.send(slot, RANKS["persistent_memory"], (stream, seq_no, 0, KIND_HIDDEN), hidden_all))
        with timer.waiting():
            for p in pending:
                p.wait()
        self.states[stream] = state
        if snapshot:
            StreamState(position + tokens.shape[1], state, {}).save(snapshot)
        knowledge_mean = float(torch.cat(knowledge, dim=1).mean())
        return {"knowledge_attention": knowledge_mean, "busy_ms": self._finish(timer)}


class LongTermMemoryStage(Stage):
    name = "long_term_memory"

    def build(self, cfg: TitansConfig) -> torch.nn.Module:
        self.states: dict[int, dict[str, dict[str, Tensor]]] = {}
        return LongTermMemory(cfg)

    def _fresh(self) -> dict[str, dict[str, Tensor]]:
        return self.module.initial_state(1, self.device, self.dtype)

    def _reset(self, position: int) -> dict[str, dict[str, Tensor]]:
        """Memory off (ablation): the initial memory at `position`, so nothing survives a segment."""
        return memory_reset_at(self.module, position, self.cfg.variant, self.device, self.dtype)

    def set_state(self, stream: int, state: dict[str, dict[str, Tensor]] | str | None) -> bool:
        if state is None:
            self.states.pop(stream, None)
        elif isinstance(state, str):
            loaded = StreamState.load(state).memory
            self.states[stream] = {layer: {k: v.to(self.device) for k, v in t.items()} for layer, t in loaded.items()}
        else:
            self.states[stream] = {layer: {k: v.to(self.device) for k, v in t.items()} for layer, t in state.items()}
        return True

    def get_state(self, stream: int, drop: bool = False) -> dict[str, dict[str, Tensor]]:
        state = self.states.pop(stream) if drop else self.states.get(stream)
        if state is None:  # a stream with no memory layers, or not started
            state = self._fresh()
        return {layer: {k: v.detach().cpu() for k, v in t.items()} for layer, t in state.items()}

    @torch.no_grad()
    def process(self, slot: int, stream: int, seq_no: int, position: int, n_tokens: int, reset: bool = False,
                snapshot: str | None = None) -> dict[str, Any]:
        timer = SegmentTimer(self.clock)
        state = self.states.get(stream)
        if state is None:
            state = self._fresh()
        elif reset:
            state = self._reset(position)
        state = dict(state)
        core = RANKS["core"]
        dim = self.cfg.model.dim
        layers = self.module.layer_ids
        surprise = {layer: 0.0 for layer in layers}
        pending: list = []
        for start, end in segment_pieces(position, n_tokens, mac_segment(self.cfg)):
            shape = (1, end - start, dim)
            for layer in layers:
                if self.cfg.variant == "mac":
                    with timer.waiting():
                        x = self.transport.recv(slot, core, (stream, seq_no, layer, KIND_RETRIEVE), shape, self.dtype)
                    h = self.module.retrieve(layer, x, state)
                    pending.append(self.transport.send(slot, core, (stream, seq_no, layer, KIND_RETRIEVED), h))
                with timer.waiting():
                    x = self.transport.recv(slot, core, (stream, seq_no, layer, KIND_UPDATE), shape, self.dtype)
                out, s = self.module.update_and_retrieve(layer, x, state)
                pending.append(self.transport.send(slot, core, (stream, seq_no, layer, KIND_UPDATED), out))
                surprise[layer] += float(s.sum())
        with timer.waiting():
            for p in pending:
                p.wait()
        self.states[stream] = state
        if snapshot:
            StreamState(position + n_tokens, {}, state).save(snapshot)
        return {"surprise": [surprise[layer] / max(n_tokens, 1) for layer in layers], "busy_ms": self._finish(timer)}


class PersistentMemoryStage(Stage):
    name = "persistent_memory"

    def build(self, cfg: TitansConfig) -> torch.nn.Module:
        return PersistentMemory(cfg)

    @torch.no_grad()
    def send_bank(self, task_id: int) -> bool:
        if self.cfg.persistent.n_tokens == 0 or self.cfg.variant == "lmm":
            return True
        bank = self.module.bank(torch.tensor([task_id]))
        self.transport.send(None, RANKS["core"], (task_id, 0, 0, KIND_BANK), bank).wait()
        return True

    def check_task(self, task_id: int) -> bool:
        self.module.check_task_ids(torch.tensor([task_id]))
        return True

    @torch.no_grad()
    def process(self, slot: int, stream: int, seq_no: int, targets: Tensor) -> dict[str, float]:
        """targets: (T,) next token of each position, NO_TARGET where there is none."""
        timer = SegmentTimer(self.clock)
        n = targets.shape[0]
        with timer.waiting():
            hidden = self.transport.recv(slot, RANKS["core"], (stream, seq_no, 0, KIND_HIDDEN),
                                         (1, n, self.cfg.model.dim), self.dtype)
        targets = targets.to(self.device)
        keep = targets != NO_TARGET
        n_predicted = int(keep.sum())
        loss_sum = 0.0
        if n_predicted:
            logits = self.module.head(hidden[0][keep])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss_sum = float(F.cross_entropy(logits, targets[keep], reduction="sum"))
        return {"loss_sum": loss_sum, "n_predicted": n_predicted, "busy_ms": self._finish(timer)}


STAGE_CLASSES = {"core": CoreStage, "long_term_memory": LongTermMemoryStage, "persistent_memory": PersistentMemoryStage}


def _ray_gpu_ids() -> list:
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a Ray worker there are no assigned GPUs
        return []


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
