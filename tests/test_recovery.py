"""Crash recovery: a stage killed mid-stream (ray.kill) is recreated, the snapshot reloaded and the stream
replayed, and the run ends with exactly the results of an uninterrupted one; without checkpoints a dead
stage is a clear error, not a hang. Plus the scheduler's and the snapshot store's own rules."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest
import torch

from titans_runtime.errors import TitansError
from titans_runtime.model.state import StreamState
from titans_runtime.runtime.checkpoint import Snapshot, SnapshotStore
from titans_runtime.runtime.pipeline import Pipeline, PipelineOptions
from titans_runtime.runtime.reference import reference_run
from titans_runtime.runtime.scheduler import Scheduler
from titans_runtime.runtime.stages import NO_TARGET

from test_pipeline import assert_same_results, assert_same_states, tiny_model, write_streams  # noqa: I001


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    ray.init(address="local", _node_ip_address="127.0.0.1", _temp_dir=f"/tmp/titans-r{os.getpid()}",
             include_dashboard=False, log_to_driver=False, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("victim", ["long_term_memory"])
def test_killed_stage_recovers_with_identical_results(ray_local, tmp_path, victim):
    model = tiny_model("mac")
    streams = write_streams(tmp_path)
    opts = PipelineOptions(segment_len=24, max_in_flight=2, checkpoint_every=3, work_dir=str(tmp_path / "run"),
                           timeout_s=60)
    got = []
    with Pipeline(model, opts) as pipe:
        for result in pipe.run(streams):
            got.append(result)
            if (result.stream, result.seq_no) == (streams[0].stream_id, 3):
                # mid-stream: a has a snapshot after its segment 2, b's next segment is in flight
                ray_local.kill(pipe.stage_actor(victim), no_restart=True)
        finals = pipe.final_states()
    assert pipe.restarts == 1
    assert pipe.recoveries[0]["stage"] == victim
    assert pipe.recoveries[0]["resumed_after"][streams[0].stream_id] == 2
    expected, expected_finals = reference_run(model, streams)
    assert_same_results(got, expected)
    assert_same_states(finals, expected_finals)

    # The last snapshot of stream a (after its 6th segment) holds the state TitanModel has there.
    snap = SnapshotStore(tmp_path / "run").latest(0)
    assert (snap.seq_no, snap.position, snap.cursor["token_offset"]) == (5, 144, 144)
    state = model.initial_state(1)
    with torch.no_grad():
        for segment in list(streams[0].segments())[:6]:
            state = model(segment.tokens[None], state=state).state
    assert_same_states({"a": snap.state()}, {"a": state})


def test_dead_stage_without_checkpoints_is_a_clear_error(ray_local, tmp_path):
    model = tiny_model("mag")
    streams = write_streams(tmp_path)
    opts = PipelineOptions(segment_len=24, max_in_flight=2, checkpoint_every=0, work_dir=str(tmp_path / "run"),
                           timeout_s=30)
    with Pipeline(model, opts) as pipe:
        run = pipe.run(streams)
        next(run)
        ray_local.kill(pipe.stage_actor("core"), no_restart=True)
        t0 = time.perf_counter()
        with pytest.raises(TitansError, match=r"stage core died.*checkpointing is off"):
            list(run)
        assert time.perf_counter() - t0 < 30  # detected from the dead actor, not by waiting for a timeout


# --------------------------------------------------------------------------------- no Ray needed
@dataclass
class FakeSegment:
    seq_no: int
    token_start: int
    token_end: int
    tokens: torch.Tensor
    cursor_after: int


class FakeStream:
    def __init__(self, stream_id: str, lengths: list[int]):
        self.stream_id, self.lengths = stream_id, lengths

    def segments(self, start: int | None = None):
        offset = sum(self.lengths[:start or 0])
        for seq in range(start or 0, len(self.lengths)):
            n = self.lengths[seq]
            yield FakeSegment(seq, offset, offset + n, torch.arange(offset, offset + n), seq + 1)
            offset += n


def test_scheduler_bounds_streams_in_flight_and_deduplicates_replays():
    sched = Scheduler([FakeStream("a", [3, 3, 1]), FakeStream("b", [2]), FakeStream("c", [4, 4])], 2, [10, 0, 0])
    assert sched.activate() == [0, 1]
    w0, w1 = sched.next_work(), sched.next_work()
    assert (w0.stream_id, w0.seq_no, w0.position) == ("a", 0, 10)   # a resumed state at position 10
    assert w0.targets.tolist() == [1, 2, 3]                          # the last target peeks the next segment
    assert (w1.stream_id, w1.is_last, w1.targets.tolist()) == ("b", True, [1, NO_TARGET])
    assert sched.next_work() is None                                 # one segment per stream in flight
    assert sched.complete(w1) and sched.activate() == [2]            # b done: c gets its slot
    assert sched.complete(w0)
    pair = [sched.next_work(), sched.next_work()]
    assert sorted((w.stream_id, w.seq_no) for w in pair) == [("a", 1), ("c", 0)]
    w2 = pair[0] if pair[0].stream_id == "c" else pair[1]
    sched.rewind(0, None)                                            # a crash: a replays from its start
    replay = sched.next_work()
    assert (replay.stream_id, replay.seq_no) == ("a", 0)
    assert not sched.complete(replay)                                # delivered already: not again
    nxt = sched.next_work()
    assert (nxt.stream_id, nxt.seq_no) == ("a", 1) and sched.complete(nxt)
    last = sched.next_work()
    assert (last.seq_no, last.is_last, last.targets.tolist()) == (2, True, [NO_TARGET])
    assert sched.complete(last) and sched.complete(w2)
    assert (sched.next_work().stream_id, sched.done) == ("c", False)


def test_snapshot_store_commits_atomically_and_keeps_only_the_latest(tmp_path):
    store = SnapshotStore(tmp_path)
    assert store.latest(3) is None
    model = tiny_model("mal")
    state = model.initial_state(1)
    for seq in (1, 3):
        core_file, memory_file = store.paths(3, seq)
        StreamState(24 * (seq + 1), state.core, {}).save(core_file)
        StreamState(24 * (seq + 1), {}, state.memory).save(memory_file)
        store.commit(3, Snapshot("s", seq, 24 * (seq + 1), {"token_offset": 24 * (seq + 1)}, core_file, memory_file))
    store.paths(3, 5)  # a snapshot being written when a crash happens is not in force
    (tmp_path / "checkpoints" / "stream-3" / "core-000000005.safetensors").write_bytes(b"partial")
    latest = store.latest(3)
    assert (latest.seq_no, latest.position) == (3, 96)
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "stream-3").iterdir())
    assert files == ["core-000000003.safetensors", "core-000000005.safetensors", "manifest.json",
                     "memory-000000003.safetensors"]
    loaded = latest.state()
    assert loaded.position == 96
    assert_same_states({"s": loaded}, {"s": StreamState(96, state.core, state.memory)})
