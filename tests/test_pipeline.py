"""The 3-actor pipeline (Ray, gloo, CPU) equals single-process TitanModel run segment by segment:
per-segment losses, surprise, knowledge attention and the final per-stream states (float64), for MAC,
MAG and MAL, several streams in flight, MAC segments split mid-segment, a last short segment, a resumed
state, and the memory-off ablation."""
from __future__ import annotations

import math
import os

import pytest
import torch

from titans_runtime.config import load_config
from titans_runtime.errors import InputError
from titans_runtime.model.titans import TitanModel
from titans_runtime.model.tokenizer import ByteTokenizer
from titans_runtime.runtime.pipeline import Pipeline, PipelineOptions
from titans_runtime.runtime.reference import reference_run
from titans_runtime.runtime.streams import open_streams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEGMENT = 24  # pipeline segments; the MAC attention segment is 16, so MAC splits segments in pieces
TEXTS = {
    "a.txt": "It was the best of times, it was the worst of times, it was the age of wisdom. " * 2,  # 160 bytes
    "b.txt": "To be, or not to be, that is the question: whether 'tis nobler " + "in the mind",    # 74: short last
    "c.txt": "All happy families are alike; each unhappy family is unhappy in its own way.",       # 76
}


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module, on loopback, no dashboard."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray")
    ray.init(address="local", _node_ip_address="127.0.0.1", _temp_dir=f"/tmp/titans-t{os.getpid()}",
             include_dashboard=False, log_to_driver=False, num_cpus=2)
    yield ray
    ray.shutdown()


def tiny_model(variant: str, seed: int = 0) -> TitanModel:
    """float64, 3 layers with memory at layers 0 and 2 (layer 1 is attention only), open gates."""
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml")).replace(**{
        "variant": variant, "dtype": "float64", "model.dim": 32, "model.n_layers": 3, "model.n_heads": 4,
        "model.n_kv_heads": 2, "memory.layers": [0, 2], "memory.heads": 2, "memory.chunk_size": 8,
        "attention.segment_len": 16, "attention.window": 12, "persistent.n_tasks": 2,
    })
    torch.manual_seed(seed)
    model = TitanModel(cfg).eval()
    with torch.no_grad():  # data-dependent memory gates, an open output gate
        for mem in model.memory.memories.values():
            mem.to_gates.weight.normal_(0.0, 0.3)
            mem.out_gate.weight.normal_(0.0, 0.1)
    return model


def write_streams(directory, names=tuple(TEXTS)) -> list:
    paths = []
    for name in names:
        path = directory / name
        path.write_text(TEXTS[name])
        paths.append(str(path))
    return open_streams(paths, ByteTokenizer(), SEGMENT)


def assert_same_results(got: list, expected: list, tol: float = 1e-10) -> None:
    key = lambda r: (r.stream, r.seq_no)  # noqa: E731
    keys = [key(r) for r in got]
    assert len(keys) == len(set(keys)), "a segment was delivered twice"
    assert sorted(keys) == sorted(key(r) for r in expected), "segments missing or extra"
    for stream in {r.stream for r in got}:  # each stream's results arrive in order
        seqs = [r.seq_no for r in got if r.stream == stream]
        assert seqs == sorted(seqs)
    by_key = {key(r): r for r in got}
    for want in expected:
        have = by_key[key(want)]
        assert (have.token_start, have.token_end, have.n_predicted) == (want.token_start, want.token_end, want.n_predicted)
        if want.n_predicted:
            assert have.loss == pytest.approx(want.loss, rel=tol, abs=tol)
            assert have.bits_per_token == pytest.approx(want.loss / math.log(2), rel=tol, abs=tol)
        else:
            assert math.isnan(have.loss)
        assert have.surprise == pytest.approx(want.surprise, rel=tol, abs=tol)
        assert have.knowledge_attention == pytest.approx(want.knowledge_attention, rel=tol, abs=tol)
        assert set(have.stage_ms) == {"core", "long_term_memory", "persistent_memory"}


def assert_same_states(got: dict, expected: dict, tol: float = 1e-12) -> None:
    assert set(got) == set(expected)
    for stream, want in expected.items():
        have = got[stream]
        assert have.position == want.position
        a, b = have.to_flat(), want.to_flat()
        assert set(a) == set(b)
        for name in b:
            assert a[name].shape == b[name].shape, name
            assert a[name].dtype == b[name].dtype, name
            torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_pipeline_equals_single_process(ray_local, tmp_path, variant):
    model = tiny_model(variant)
    streams = write_streams(tmp_path)
    # 3 streams, 2 in flight: the third waits for a slot; b and c end with a short segment.
    opts = PipelineOptions(segment_len=SEGMENT, max_in_flight=2, work_dir=str(tmp_path / "run"), timeout_s=60, task_id=1)
    with Pipeline(model, opts) as pipe:
        if variant == "mag":  # a run abandoned mid-way leaves the pipeline usable
            for _ in pipe.run(streams):
                break
        got = list(pipe.run(streams))
        finals = pipe.final_states()
        stats = pipe.stage_stats()
        # A second run in the same pipeline continues new streams from the states of the first.
        (tmp_path / "more").mkdir()
        more = write_streams(tmp_path / "more", ("c.txt", "b.txt"))
        resume = {more[0].stream_id: finals[streams[0].stream_id], more[1].stream_id: finals[streams[1].stream_id]}
        got_more = list(pipe.run(more, resume=resume))
        finals_more = {s.stream_id: pipe.final_states()[s.stream_id] for s in more}
        if variant == "mac":  # the ablation: long-term memory reset at every segment
            (tmp_path / "off").mkdir()
            off = write_streams(tmp_path / "off", ("a.txt",))
            got_off = list(pipe.run(off, memory_off=True))
            finals_off = {off[0].stream_id: pipe.final_states()[off[0].stream_id]}
    expected, expected_finals = reference_run(model, streams, task_id=1)
    assert_same_results(got, expected)
    assert_same_states(finals, expected_finals)
    expected_more, expected_finals_more = reference_run(model, more, resume=resume, task_id=1)
    assert_same_results(got_more, expected_more)
    assert_same_states(finals_more, expected_finals_more)
    assert len(got) == 7 + 4 + 4
    if variant == "mac":
        expected_off, expected_finals_off = reference_run(model, off, memory_off=True, task_id=1)
        assert_same_results(got_off, expected_off)
        assert_same_states(finals_off, expected_finals_off)
        assert got_off[-1].loss != pytest.approx(expected[6].loss, rel=1e-6)  # the ablation changes the result
    for stage in ("core", "long_term_memory", "persistent_memory"):
        assert stats[stage]["segments"] == len(got) + (2 if variant == "mag" else 0)  # + the abandoned run's 2
        assert stats[stage]["busy_s"] > 0


def test_unknown_task_id_is_refused_before_anything_starts():
    with pytest.raises(InputError, match="unknown task id 5"):
        Pipeline(tiny_model("mac"), PipelineOptions(task_id=5))


def test_bad_options_are_refused():
    with pytest.raises(InputError, match="max_in_flight"):
        Pipeline(tiny_model("mac"), PipelineOptions(max_in_flight=0))
    with pytest.raises(InputError, match="model folder not found"):
        Pipeline("/no/such/model", PipelineOptions())
