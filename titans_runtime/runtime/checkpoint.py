"""Stream snapshots for crash recovery.

Every N segments of a stream, the core and long-term memory stages each write their part of the
stream's state (safetensors, StreamState format) right after the same segment; once both files exist
the driver writes the stream's manifest (atomically: write, then rename) with the stream's resume
Cursor. A snapshot counts only once its manifest names it, so a crash while writing leaves the
previous snapshot in force. After a crash the stages load the files and the stream replays from the
cursor."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from titans_runtime.model.state import StreamState

MANIFEST = "manifest.json"


@dataclass
class Snapshot:
    stream_id: str
    seq_no: int             # last segment included in the state
    position: int           # model position after that segment
    cursor: dict[str, Any]  # the stream's Cursor after that segment (Cursor.to_dict())
    core_file: str
    memory_file: str

    def state(self) -> StreamState:
        """The whole stream state of this snapshot (core + long-term memory)."""
        core = StreamState.load(self.core_file)
        memory = StreamState.load(self.memory_file)
        return StreamState(position=self.position, core=core.core, memory=memory.memory)


class SnapshotStore:
    """Snapshots of every stream of one run, under `<work_dir>/checkpoints/stream-<index>/`."""

    def __init__(self, work_dir: str | Path):
        self.root = Path(work_dir) / "checkpoints"

    def stream_dir(self, stream: int) -> Path:
        return self.root / f"stream-{stream}"

    def paths(self, stream: int, seq_no: int) -> tuple[str, str]:
        """Where the core and the memory stage write the snapshot after segment `seq_no`."""
        d = self.stream_dir(stream)
        d.mkdir(parents=True, exist_ok=True)
        return str(d / f"core-{seq_no:09d}.safetensors"), str(d / f"memory-{seq_no:09d}.safetensors")

    def commit(self, stream: int, snapshot: Snapshot) -> None:
        """Make `snapshot` the stream's recovery point and delete the files of older ones."""
        d = self.stream_dir(stream)
        tmp = d / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(snapshot.__dict__, indent=1))
        os.replace(tmp, d / MANIFEST)
        keep = {Path(snapshot.core_file).name, Path(snapshot.memory_file).name, MANIFEST}
        for f in d.iterdir():
            if f.name not in keep and f.suffix == ".safetensors":
                f.unlink(missing_ok=True)

    def latest(self, stream: int) -> Snapshot | None:
        path = self.stream_dir(stream) / MANIFEST
        if not path.is_file():
            return None
        return Snapshot(**json.loads(path.read_text()))

    def clear(self, stream: int) -> None:
        d = self.stream_dir(stream)
        if d.is_dir():
            for f in d.iterdir():
                f.unlink(missing_ok=True)
            d.rmdir()
