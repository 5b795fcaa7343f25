"""`titans-run` (launch/run.py) end to end: as a subprocess without a cluster and against a `ray start`
cluster on loopback, its per-segment JSON lines checked against the single-process reference, resume
== uninterrupted, generation, every bad input -> one `error:` line and exit 2, bounded memory."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from titans_runtime.cli.run import load_resume_states, main, result_record, save_states
from titans_runtime.config import TitansConfig
from titans_runtime.generate import generate
from titans_runtime.model.checkpoint import load_model, save_model
from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import TitanModel
from titans_runtime.model.tokenizer import ByteTokenizer
from titans_runtime.runtime.reference import reference_run
from titans_runtime.runtime.streams import open_streams

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RUN = [sys.executable, str(REPO / "launch" / "run.py")]
SEGMENT = 128
HALF = 4 * SEGMENT          # the book is cut here into part 1 and part 2 (a segment boundary)
TOL = 1e-9                  # float64 model: pipeline vs single process differ by round-off only
STAGES = {"core", "long_term_memory", "persistent_memory"}


def tiny_config(**overrides) -> TitansConfig:
    base = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
            "memory.layers": [1], "memory.heads": 2, "persistent.n_tasks": 2, "dtype": "float64"}
    return TitansConfig().replace(**{**base, **overrides})


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Token auth off: the loopback cluster is private to the test, and parallel Ray starts on one machine
    # would otherwise race on the shared ~/.ray/auth_token file.
    env.update(PYTHONIOENCODING="utf-8", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    return env


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI in its own session, so that on a timeout the local Ray it started goes down with it."""
    proc = subprocess.Popen([*RUN, *args], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"titans-run timed out after {timeout} s; stderr: {err.decode()[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = TitanModel(tiny_config())
    save_model(model, root / "model")
    book = (DATA / "corpora" / "tinyshakespeare.txt").read_bytes()[:2 * HALF]
    other = (DATA / "corpora" / "wikitext2_valid.txt").read_bytes()[:400]  # last segment is short
    paths = {"book1": root / "one" / "book.txt", "other": root / "one" / "other.txt",
             "book2": root / "two" / "book.txt", "full": root / "full" / "book.txt"}
    for key, data in {"book1": book[:HALF], "other": other, "book2": book[HALF:], "full": book}.items():
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        paths[key].write_bytes(data)
    return SimpleNamespace(root=root, model=root / "model", **{k: str(v) for k, v in paths.items()})


def common_args(files, work: Path) -> list[str]:
    return ["--model", str(files.model), "--segment-len", str(SEGMENT), "--max-in-flight", "2",
            "--dashboard", "off", "--work-dir", str(work)]


def reference(files, paths: list[str]):
    model = load_model(files.model)
    return reference_run(model, open_streams(paths, ByteTokenizer(), SEGMENT))


def assert_same_segments(got: list[dict], want: list, seq_offset: int = 0) -> None:
    assert [(r["stream"], r["seq_no"]) for r in got] == [(w.stream, w.seq_no - seq_offset) for w in want]
    for r, w in zip(got, want):
        assert r["n_predicted"] == w.n_predicted
        assert r["token_end"] - r["token_start"] == w.token_end - w.token_start
        assert math.isclose(r["loss"], w.loss, rel_tol=TOL, abs_tol=TOL)
        assert math.isclose(r["bits_per_token"], w.loss / math.log(2), rel_tol=TOL, abs_tol=TOL)
        assert r["surprise"] == pytest.approx(w.surprise, rel=TOL, abs=TOL)
        assert math.isclose(r["knowledge_attention"], w.knowledge_attention, rel_tol=TOL, abs_tol=TOL)


# ------------------------------------------------------------------------------- without a cluster
@pytest.fixture(scope="module")
def first_run(files):
    """Part 1 of the book and another stream through the pipeline on a local Ray started by the CLI."""
    out = files.root / "run1"
    proc = run_cli("--stream", files.book1, "--stream", files.other, "--metrics-out", str(out / "m.jsonl"),
                   "--state-out", str(out / "states"), *common_args(files, out / "work"))
    return SimpleNamespace(proc=proc, metrics=out / "m.jsonl", states=out / "states")


def test_cli_without_cluster_writes_the_single_process_results(files, first_run):
    proc = first_run.proc
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    records = read_jsonl(first_run.metrics)
    assert set(records[0]) == {"stream", "seq_no", "token_start", "token_end", "loss", "bits_per_token",
                               "surprise", "knowledge_attention", "stage_ms", "n_predicted"}
    for r in records:
        assert set(r["stage_ms"]) == STAGES and all(ms > 0 for ms in r["stage_ms"].values())
    # Order across streams is the pipeline's; within a stream results are in order and contiguous.
    by_stream = {s: [r for r in records if r["stream"] == s] for s in (files.book1, files.other)}
    for rows in by_stream.values():
        assert [r["seq_no"] for r in rows] == list(range(len(rows)))
        assert [r["token_start"] for r in rows[1:]] == [r["token_end"] for r in rows[:-1]]
    assert by_stream[files.other][-1]["token_end"] == 400 and by_stream[files.book1][-1]["token_end"] == HALF
    want, finals = reference(files, [files.book1, files.other])
    assert_same_segments(by_stream[files.book1] + by_stream[files.other], want)
    # --state-out: one file per stream and an index; the states are the single-process final states.
    index = json.loads((first_run.states / "index.json").read_text())
    assert set(index["streams"]) == {files.book1, files.other}
    for sid, entry in index["streams"].items():
        saved = StreamState.load(first_run.states / entry["file"])
        assert saved.position == entry["position"] == finals[sid].position
        for name, tensor in finals[sid].to_flat().items():
            torch.testing.assert_close(saved.to_flat()[name], tensor, rtol=1e-9, atol=1e-9)
    stdout = proc.stdout.decode()
    assert "streams" in stdout and "stages" in stdout and f"{HALF:,}" in stdout


# ----------------------------------------------------------------------------- against a cluster
def _session_members(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


def stop_session(sid: int) -> None:
    """SIGTERM, then SIGKILL, every process of session `sid` (one this test started)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pid in _session_members(sid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and _session_members(sid):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head` on loopback in a new session; teardown stops exactly that session's processes
    (`ray stop` would also stop every other Ray on the machine)."""
    port = free_port()
    temp_dir = f"/tmp/tcli{os.getpid()}"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port),
           "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "false",
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    starter = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    sid = starter.pid  # the session id of everything `ray start` spawns
    try:
        output, _ = starter.communicate(timeout=180)
        if starter.returncode != 0:
            pytest.fail(f"ray start failed: {output.decode()[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        if starter.poll() is None:
            starter.kill()
        stop_session(sid)


def test_cli_on_cluster_resumes_identically_and_generates(files, first_run, cluster):
    assert first_run.proc.returncode == 0
    out = files.root / "run2"
    prompt = "ROMEO:"
    proc = run_cli("--stream", files.book2, "--resume", str(first_run.states), "--address", cluster,
                   "--metrics-out", str(out / "m.jsonl"), "--generate", "24", "--prompt", prompt,
                   "--temperature", "0", *common_args(files, out / "work"))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    # The resumed part 2 equals the second half of an uninterrupted run of the whole book.
    want, finals = reference(files, [files.full])
    second_half = [w for w in want if w.token_start >= HALF]
    for w in second_half:
        w.stream = files.book2
    records = read_jsonl(out / "m.jsonl")
    assert_same_segments(records, second_half, seq_offset=HALF // SEGMENT)
    assert [r["token_start"] for r in records] == [w.token_start - HALF for w in second_half]
    # Generation continues the memorised state: greedy text = TitanModel's from the full run's state.
    model = load_model(files.model)
    ids, _ = generate(model, finals[files.full], ByteTokenizer().encode(prompt), 24, temperature=0)
    stdout = proc.stdout.decode("utf-8")
    assert f"--- generated from {files.book2} ---" in stdout
    assert prompt + ByteTokenizer().decode(ids) in stdout


# ---------------------------------------------------------------------------------- bad input
def _bad_cases(files, tmp: Path) -> dict[str, tuple[list[str], str]]:
    empty, nul, no_index, hardware = tmp / "empty.txt", tmp / "nul.txt", tmp / "not_states", tmp / "hw.yaml"
    empty.write_text("")
    hardware.write_text("name: tiny-box\ndevices: [{name: small, memory_gib: 1}]\nstages:\n"
                        + "".join(f"  {s}: {{device: 0, budget_gib: 0.1}}\n" for s in sorted(STAGES)))
    nul.write_bytes(b"some text\0more text\n")
    no_index.mkdir()
    model = ["--model", str(files.model)]
    return {
        "missing file": ([*model, "--stream", str(tmp / "nope.txt")], "not found"),
        "empty file": ([*model, "--stream", str(empty)], "empty file"),
        "NUL bytes": ([*model, "--stream", str(nul)], "NUL"),
        "unknown task id": ([*model, "--stream", files.book1, "--task-id", "5"], "unknown task id 5"),
        "no Ray at address": ([*model, "--stream", files.book1, "--address", f"127.0.0.1:{free_port()}"],
                              "no Ray cluster reachable"),
        "bad address": ([*model, "--stream", files.book1, "--address", "nowhere"], "HOST:PORT"),
        "missing model": (["--model", str(tmp / "no_model"), "--stream", files.book1], "model folder not found"),
        "model and config": ([*model, "--config", str(REPO / "configs" / "tiny.yaml"), "--stream", files.book1],
                             "not both"),
        "resume without index": ([*model, "--stream", files.book1, "--resume", str(no_index)], "index.json"),
        "generate without prompt": ([*model, "--stream", files.book1, "--generate", "5"], "--prompt"),
        "bad segment length": ([*model, "--stream", files.book1, "--segment-len", "0"], "--segment-len"),
        "unknown option": ([*model, "--stream", files.book1, "--bogus"], "--bogus"),
        "resume without stream or generate": ([*model, "--resume", str(no_index)], "no input"),
        "plan over budget": ([*model, "--stream", files.book1, "--hardware", str(hardware)], "over budget"),
    }


def test_every_bad_input_is_one_error_line_and_exit_2(files, tmp_path, capsys):
    for name, (argv, needle) in _bad_cases(files, tmp_path).items():
        code = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, captured.err)
        if name == "plan over budget":  # the plan's table goes to stdout, the verdict is the error line
            assert "DOES NOT FIT" in captured.out and "budget" in captured.out
        else:
            assert captured.out == "", name


def test_bad_input_in_a_real_process_prints_no_traceback(files, tmp_path):
    proc = run_cli("--model", str(files.model), "--stream", str(tmp_path / "missing.txt"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines() == [f"error: input stream not found: {tmp_path / 'missing.txt'}"]


# ------------------------------------------------------------------------------ small pieces
def test_resume_matching_by_id_then_file_name(tmp_path):
    model = TitanModel(tiny_config())
    a, b = model.initial_state(1), model.initial_state(1)
    a.position, b.position = 10, 20
    save_states(tmp_path, {"x/a.txt": a, "x/b.txt": b}, meta={})
    got = load_resume_states(tmp_path, ["y/b.txt", "x/a.txt"])
    assert {k: v.position for k, v in got.items()} == {"y/b.txt": 20, "x/a.txt": 10}
    assert {k: v.position for k, v in load_resume_states(tmp_path, []).items()} == {"x/a.txt": 10, "x/b.txt": 20}
    with pytest.raises(Exception, match="no saved state for stream 'y/c.txt'"):
        load_resume_states(tmp_path, ["y/c.txt", "x/a.txt"])


def test_result_record_writes_nan_as_null():
    r = SimpleNamespace(stream="s", seq_no=3, token_start=0, token_end=1, loss=math.nan, bits_per_token=math.nan,
                        surprise=[0.5], knowledge_attention=0.25, stage_ms={"core": 1.23456}, n_predicted=0)
    line = json.dumps(result_record(r), allow_nan=False)
    assert json.loads(line)["loss"] is None and json.loads(line)["stage_ms"] == {"core": 1.235}


# ------------------------------------------------------------------------------ bounded memory
def test_200k_token_stream_runs_in_bounded_memory(tmp_path, monkeypatch):
    """Resident memory of the driver and of each stage after ~50k tokens vs after 200k: flat. Each side
    takes the peak over a 75k-token window (the allocator's transient swings average out); a leak of a
    few hundred bytes per token (hidden states, logits, results) would add > 64 MB over 150k tokens."""
    from titans_runtime.cli.summary import RunSummary
    from titans_runtime.runtime.metrics import rss_bytes
    from titans_runtime.runtime.pipeline import Pipeline, PipelineOptions
    from titans_runtime.cli.run import drive

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    torch.manual_seed(0)
    cfg = TitansConfig().replace(**{"model.dim": 16, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 1,
                                    "memory.layers": [0], "memory.heads": 2, "memory.depth": 1, "variant": "mag",
                                    "persistent.n_tokens": 2})
    n_tokens, segment = 200_000, 2048
    text = tmp_path / "long.txt"
    text.write_bytes((DATA / "corpora" / "tinyshakespeare.txt").read_bytes()[:n_tokens])
    streams = open_streams([str(text)], ByteTokenizer(), segment)
    options = PipelineOptions(segment_len=segment, max_in_flight=2, work_dir=str(tmp_path / "work"),
                              include_dashboard=False, check_plan=False)
    summary, samples = RunSummary(), []
    with Pipeline(TitanModel(cfg), options) as pipe, open(tmp_path / "m.jsonl", "w") as sink:
        def on_result(r) -> None:  # the CLI's per-segment work, then a memory sample
            summary.add(r)
            sink.write(json.dumps(result_record(r)) + "\n")
            stats = pipe.stage_stats()
            samples.append((r.token_end, {"driver": rss_bytes(), **{s: stats[s]["memory_bytes"] for s in STAGES}}))

        drive(pipe, streams, None, [on_result])
    assert summary.tokens == n_tokens
    early = [m for end, m in samples if 25_000 <= end <= 100_000]
    late = [m for end, m in samples if end >= 125_000]
    for process in ("driver", *sorted(STAGES)):
        grown = max(m[process] for m in late) - max(m[process] for m in early)
        assert grown < 64 * 2 ** 20, f"{process} resident memory grew by {grown / 2 ** 20:.0f} MB"


def test_no_stream_runs_the_shipped_sample(files, tmp_path, monkeypatch, capsys):
    """The README's main command has no --stream: it reads the sample text shipped in the package."""
    import titans_runtime.cli.run as run_module

    assert run_module.SAMPLE_STREAM.is_file() and run_module.SAMPLE_STREAM.stat().st_size > 10_000
    sample = tmp_path / "sample.txt"
    sample.write_bytes(run_module.SAMPLE_STREAM.read_bytes()[:300])  # the shipped text, kept short here
    monkeypatch.setattr(run_module, "SAMPLE_STREAM", sample)
    metrics = tmp_path / "metrics.jsonl"
    code = main(["--model", str(files.model), "--single-process", "--no-progress", "--metrics-out", str(metrics)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "shipped sample text" in captured.err
    records = read_jsonl(metrics)
    assert {r["stream"] for r in records} == {str(sample)} and records[-1]["token_end"] == 300
