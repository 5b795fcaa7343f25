"""The runtime's dashboard metrics reach Ray's Prometheus endpoint with the right values, and the
driver-side helpers (token rate, progress lines) compute what they say."""
from __future__ import annotations

import math
import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from titans_runtime.cli.run import drive
from titans_runtime.config import TitansConfig
from titans_runtime.model.titans import TitanModel
from titans_runtime.model.tokenizer import ByteTokenizer
from titans_runtime.runtime.metrics import RuntimeMetrics, TokenRate
from titans_runtime.runtime.pipeline import Pipeline, PipelineOptions
from titans_runtime.runtime.progress import ProgressReporter
from titans_runtime.runtime.streams import open_streams

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STAGES = ("core", "long_term_memory", "persistent_memory")
SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format -> name -> [(labels, value)] (our metrics only)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if line.startswith("#") or not match or "titans_" not in match["name"]:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        samples.setdefault(match["name"], []).append((labels, float(match["value"])))
    return samples


def by_tag(samples, name: str, tag: str) -> dict[str, float]:
    return {labels.get(tag): value for labels, value in samples.get(name, [])}


def test_dashboard_metrics_are_exported_to_prometheus(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a private loopback Ray; no shared token file race
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    port = free_port()
    ray.init(address="local", _metrics_export_port=port, include_dashboard=False, num_cpus=2,
             _node_ip_address="127.0.0.1", _temp_dir=f"/tmp/tmet{os.getpid()}", log_to_driver=False)
    try:
        torch.manual_seed(0)
        cfg = TitansConfig().replace(**{"model.dim": 32, "model.n_layers": 2, "model.n_heads": 2,
                                        "model.n_kv_heads": 1, "memory.layers": [1], "memory.heads": 2})
        text = tmp_path / "s.txt"
        text.write_bytes((DATA / "corpora" / "tinyshakespeare.txt").read_bytes()[:3000])
        streams = open_streams([str(text)], ByteTokenizer(), 256)
        options = PipelineOptions(segment_len=256, max_in_flight=2, work_dir=str(tmp_path / "work"),
                                  check_plan=False)
        with Pipeline(TitanModel(cfg), options) as pipe:  # joins the Ray started above
            metrics = RuntimeMetrics()
            last = []
            drive(pipe, streams, None, [lambda r: (metrics.record_segment(r, cfg.memory_layers), last.append(r))],
                  [lambda n, stats: metrics.record_pipeline(n, stats, {"core": 123})], stats_every_s=0.0)
            stats = pipe.stage_stats()
            # Ray's metrics agent exports every few seconds: poll until the final values are there.
            deadline, samples = time.monotonic() + 90, {}
            while time.monotonic() < deadline:
                samples = scrape(port)
                tokens = [v for _, v in samples.get("ray_titans_tokens_processed_total", [])]
                if tokens == [3000.0] and "ray_titans_stage_busy_fraction" in samples:
                    break
                time.sleep(2)
    finally:
        ray.shutdown()
    assert [v for _, v in samples["ray_titans_tokens_processed_total"]] == [3000.0]
    assert [v for _, v in samples["ray_titans_segments_in_flight"]] == [0.0]
    assert samples["ray_titans_tokens_per_second"][0][1] > 0
    busy = by_tag(samples, "ray_titans_stage_busy_fraction", "stage")
    assert set(busy) == set(STAGES) and all(0 < v <= 1 for v in busy.values())
    memory = by_tag(samples, "ray_titans_stage_memory_bytes", "stage")
    assert set(memory) == set(STAGES) and all(v > 2 ** 20 for v in memory.values())
    assert by_tag(samples, "ray_titans_stage_memory_budget_bytes", "stage") == {"core": 123.0}
    surprise = by_tag(samples, "ray_titans_memory_surprise", "layer")
    assert list(surprise) == ["1"] and math.isclose(surprise["1"], last[-1].surprise[0], rel_tol=1e-6)
    assert math.isclose(samples["ray_titans_loss_bits_per_token"][0][1], last[-1].bits_per_token, rel_tol=1e-6)
    assert all(stats[s]["segments"] == 12 for s in STAGES)  # 3000 tokens / 256 per segment


def test_token_rate_counts_tokens_in_the_window():
    rate = TokenRate(window_s=10.0)
    rate.created = 0.0
    rate.add(100, now=1.0)
    assert rate.rate(now=2.0) == pytest.approx(50.0)      # 100 tokens in the first 2 s
    rate.add(300, now=12.0)
    assert rate.rate(now=12.0) == pytest.approx(30.0)     # the first event left the 10 s window
    assert rate.rate(now=30.0) == 0.0


def test_plain_progress_line_has_tokens_rate_eta_and_in_flight(capsys):
    import sys

    progress = ProgressReporter(total_tokens=1000, stream=sys.stderr, live=False)
    progress.started -= 10.0  # 10 s ago
    progress.update(250, in_flight=3)
    line = progress.plain_line()
    assert line.startswith("progress: 250/1,000 tokens (25.0%), ")
    assert "ETA 30 s" in line and "in flight 3" in line and "tok/s" in line
    progress.close()
