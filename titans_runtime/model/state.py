"""Per-stream state: the core's attention caches, the long-term memory's fast weights, momentum, conv
tails and pending chunk, and the stream position. Saved and loaded as safetensors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from titans_runtime.errors import InputError

STATE_FORMAT = "titans-state-v1"


@dataclass
class StreamState:
    position: int                      # tokens of the stream consumed so far
    core: dict[str, Tensor]
    memory: dict[str, dict[str, Tensor]]

    @property
    def batch_size(self) -> int:
        for tensors in [self.core, *self.memory.values()]:
            for t in tensors.values():
                if t.dim() > 0:
                    return t.shape[0]
        return 1

    def to_flat(self) -> dict[str, Tensor]:
        flat = {f"core.{k}": v for k, v in self.core.items()}
        for layer, tensors in self.memory.items():
            flat.update({f"memory.{layer}.{k}": v for k, v in tensors.items()})
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Tensor], position: int) -> "StreamState":
        core: dict[str, Tensor] = {}
        memory: dict[str, dict[str, Tensor]] = {}
        for name, value in flat.items():
            part, rest = name.split(".", 1)
            if part == "core":
                core[rest] = value
            else:
                layer, key = rest.split(".", 1)
                memory.setdefault(layer, {})[key] = value
        return cls(position=position, core=core, memory=memory)

    def detach(self) -> "StreamState":
        """Cut the autograd history (truncated back-propagation between segments)."""
        flat = {k: v.detach() for k, v in self.to_flat().items()}
        return StreamState.from_flat(flat, self.position)

    def to(self, device: torch.device | str) -> "StreamState":
        return StreamState.from_flat({k: v.to(device) for k, v in self.to_flat().items()}, self.position)

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        """Write safetensors (contiguous, detached copies) with the position and `meta` as metadata."""
        tensors = {k: v.detach().contiguous().clone() for k, v in self.to_flat().items()}
        metadata = {"format": STATE_FORMAT, "position": str(self.position), "meta": json.dumps(meta or {})}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "StreamState":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"state file not found: {path}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != STATE_FORMAT:
            raise InputError(f"{path}: not a titans stream state (format {metadata.get('format')!r})")
        return cls.from_flat(load_file(str(path), device=str(device)), int(metadata["position"]))

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))


def split_batch(state: StreamState) -> list[StreamState]:
    """One StreamState per batch row (scalars such as `seen` are shared)."""
    flat = state.to_flat()
    rows = []
    for b in range(state.batch_size):
        rows.append(StreamState.from_flat({k: (v[b:b + 1] if v.dim() > 0 else v) for k, v in flat.items()},
                                          state.position))
    return rows


def cat_batch(states: list[StreamState]) -> StreamState:
    """Stack per-stream states (same position) into one batched state."""
    if len({s.position for s in states}) != 1:
        raise ValueError("only states at the same stream position can be batched")
    flats = [s.to_flat() for s in states]
    merged = {k: (torch.cat([f[k] for f in flats]) if flats[0][k].dim() > 0 else flats[0][k]) for k in flats[0]}
    return StreamState.from_flat(merged, states[0].position)
