"""Tokens/s of the 3-stage Ray pipeline vs the single-process TitanModel on the same streams, side by side
in one run, with the same total torch threads (pipeline: threads-per-stage x 3 stages; single process:
that many threads; and, as a second baseline, the single process with 1 thread, which on a small or
busy machine avoids OpenMP contention). Also prints the per-stage busy fractions and checks that both give the same losses.

    python tools/bench_pipeline.py                      # default model, 4 streams x 20k tokens
    python tools/bench_pipeline.py --config configs/tiny.yaml --tokens-per-stream 5000

Target on CPU: pipeline >= 0.8x single process."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from titans_runtime.cli.run import drive
from titans_runtime.cli.single_process import SingleProcessRunner
from titans_runtime.errors import TitansError, report_error
from titans_runtime.model.checkpoint import load_or_build
from titans_runtime.model.tokenizer import load_tokenizer
from titans_runtime.runtime.pipeline import STAGES, Pipeline, PipelineOptions
from titans_runtime.runtime.streams import open_streams

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora"


def write_streams(directory: Path, n_streams: int, n_bytes: int) -> list[str]:
    """n_streams different text files of n_bytes each, cut from the two corpora."""
    corpus = b"".join((DATA / name).read_bytes() for name in ("tinyshakespeare.txt", "wikitext2_valid.txt"))
    step = max((len(corpus) - n_bytes) // max(n_streams - 1, 1), 0)
    paths = []
    for i in range(n_streams):
        start = min(i * step, len(corpus) - n_bytes)
        path = directory / f"stream{i}.txt"
        path.write_bytes(corpus[start:start + n_bytes])
        paths.append(str(path))
    return paths


def timed_run(runner, streams) -> tuple[float, list, dict]:
    results = []
    before = runner.stage_stats()
    start = time.perf_counter()
    drive(runner, streams, None, [results.append])
    wall = time.perf_counter() - start
    after = runner.stage_stats()
    busy = {s: (after[s]["busy_s"] - before[s]["busy_s"]) / wall for s in after}
    return wall, results, busy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model folder (default: the shipped model)")
    p.add_argument("--config", default=None, help="instead of --model: random init from this config")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens-per-stream", type=int, default=20_000, help="bytes per stream file")
    p.add_argument("--segment-len", type=int, default=256)
    p.add_argument("--max-in-flight", type=int, default=4)
    p.add_argument("--threads-per-stage", type=int, default=1)
    args = p.parse_args(argv)
    try:
        model = load_or_build(args.model, args.config)
    except TitansError as exc:
        return report_error(exc)
    model.eval()
    total_threads = args.threads_per_stage * len(STAGES)
    tokenizer = load_tokenizer(model.config.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_streams(Path(tmp), args.streams, args.tokens_per_stream)
        streams = open_streams(paths, tokenizer, args.segment_len)
        warm_path = Path(tmp) / "warmup.txt"  # one segment through each side first: first-call costs out
        warm_path.write_bytes(Path(paths[0]).read_bytes()[:args.segment_len])
        warmup = open_streams([str(warm_path)], tokenizer, args.segment_len)

        single = {}  # threads -> (wall, results): the same total threads, and 1 thread (no OpenMP contention)
        for threads in dict.fromkeys([total_threads, 1]):
            torch.set_num_threads(threads)
            runner = SingleProcessRunner(model)
            timed_run(runner, warmup)
            single[threads] = timed_run(runner, streams)[:2]
        single_wall, single_results = single[total_threads]

        torch.set_num_threads(1)  # the driver only schedules
        options = PipelineOptions(segment_len=args.segment_len, max_in_flight=args.max_in_flight,
                                  threads_per_stage=args.threads_per_stage, work_dir=os.path.join(tmp, "work"),
                                  include_dashboard=False, check_plan=False)
        started = time.perf_counter()
        with Pipeline(model, options) as pipe:
            startup = time.perf_counter() - started
            timed_run(pipe, warmup)
            pipe_wall, pipe_results, pipe_busy = timed_run(pipe, streams)

    tokens = sum(r.token_end - r.token_start for r in single_results)
    ref = {(r.stream, r.seq_no): r.loss for r in single_results}
    diff = max(abs(r.loss - ref[(r.stream, r.seq_no)]) for r in pipe_results if r.n_predicted)
    single_rate, pipe_rate = tokens / single_wall, tokens / pipe_wall
    print(f"model: {model.config.name} ({model.config.variant}, dim {model.config.model.dim}, "
          f"{model.config.model.n_layers} layers, {model.config.dtype}); {args.streams} streams x "
          f"{args.tokens_per_stream:,} tokens, segment {args.segment_len}, {total_threads} threads in all, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':>16} {'wall s':>9} {'tokens/s':>10}")
    for threads, (wall, _) in single.items():
        print(f"{f'single, {threads} thr':>16} {wall:9.2f} {tokens / wall:10.0f}")
    print(f"{'pipeline':>16} {pipe_wall:9.2f} {pipe_rate:10.0f}   (+ {startup:.1f} s to start Ray and the stages)")
    print(f"pipeline / single process ({total_threads} threads): {pipe_rate / single_rate:.2f}x (target >= 0.80)")
    if 1 in single and total_threads != 1:
        print(f"pipeline / single process (1 thread):  {pipe_rate * single[1][0] / tokens:.2f}x")
    print("pipeline stage busy fraction: " + ", ".join(f"{s} {pipe_busy[s]:.2f}" for s in STAGES))
    print(f"max |loss difference| pipeline vs single process: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
