"""One long stream (2,000,000 tokens by default) through the 3-stage pipeline: wall time, tokens/s, and
resident memory of the driver and of each stage at 100k tokens and at the end (must be flat).

    python tools/bench_stream.py                          # default model, 2M tokens
    python tools/bench_stream.py --tokens 300000          # shorter
    python tools/bench_stream.py --config configs/tiny.yaml --tokens 300000

The stream is the two corpora under shared/data repeated to length, written to a temp file and read
lazily by the pipeline. Target: 2M tokens under 10 minutes on a 2-core CPU."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from titans_runtime.cli.run import drive
from titans_runtime.errors import TitansError, report_error
from titans_runtime.model.checkpoint import load_or_build
from titans_runtime.model.tokenizer import load_tokenizer
from titans_runtime.runtime.metrics import rss_bytes
from titans_runtime.runtime.pipeline import STAGES, Pipeline, PipelineOptions
from titans_runtime.runtime.streams import open_streams

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora"
MB = 2 ** 20


def write_long_text(path: Path, n_bytes: int) -> None:
    corpus = b"".join((DATA / name).read_bytes() for name in ("tinyshakespeare.txt", "wikitext2_valid.txt"))
    with open(path, "wb") as f:
        left = n_bytes
        while left > 0:
            f.write(corpus[:left])
            left -= min(left, len(corpus))


def memory_sample(pipe) -> dict[str, tuple[int, int]]:
    """process -> (resident bytes now, peak resident bytes)."""
    stats = pipe.stage_stats()
    driver_peak = _peak_self()
    return {"driver": (rss_bytes(), driver_peak), **{s: (stats[s]["memory_bytes"], stats[s]["peak_bytes"]) for s in STAGES}}


def _peak_self() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model folder (default: the shipped model)")
    p.add_argument("--config", default=None, help="instead of --model: random init from this config")
    p.add_argument("--tokens", type=int, default=2_000_000, help="stream length in bytes (= tokens, byte tokenizer)")
    p.add_argument("--segment-len", type=int, default=2048)
    p.add_argument("--max-in-flight", type=int, default=2)
    p.add_argument("--threads-per-stage", type=int, default=1)
    p.add_argument("--sample-at", type=int, default=100_000, help="first memory sample after this many tokens")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        model = load_or_build(args.model, args.config)
    except TitansError as exc:
        return report_error(exc)
    tokenizer = load_tokenizer(model.config.tokenizer)
    samples: dict[str, dict] = {}
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.txt"
        write_long_text(path, args.tokens)
        streams = open_streams([str(path)], tokenizer, args.segment_len)
        options = PipelineOptions(segment_len=args.segment_len, max_in_flight=args.max_in_flight,
                                  threads_per_stage=args.threads_per_stage, work_dir=os.path.join(tmp, "work"),
                                  include_dashboard=False, check_plan=False)
        started = time.perf_counter()
        with Pipeline(model, options) as pipe:
            startup = time.perf_counter() - started
            run_start = time.perf_counter()
            last_print = run_start

            def on_result(r) -> None:
                nonlocal tokens, last_print
                tokens += r.token_end - r.token_start
                if "first" not in samples and tokens >= args.sample_at:
                    samples["first"] = {"tokens": tokens, **memory_sample(pipe)}
                now = time.perf_counter()
                if now - last_print >= 30:
                    last_print = now
                    print(f"  {tokens:,} tokens, {tokens / (now - run_start):,.0f} tok/s", file=sys.stderr, flush=True)

            drive(pipe, streams, None, [on_result])
            wall = time.perf_counter() - run_start
            samples["end"] = {"tokens": tokens, **memory_sample(pipe)}
    cfg = model.config
    print(f"model: {cfg.name} ({cfg.variant}, dim {cfg.model.dim}, {cfg.model.n_layers} layers, {cfg.dtype}); "
          f"segment {args.segment_len}, {args.max_in_flight} in flight, {os.cpu_count()} CPUs")
    print(f"{tokens:,} tokens in {wall:.1f} s = {tokens / wall:,.0f} tokens/s "
          f"(+ {startup:.1f} s to start Ray and the stages)")
    first = samples.get("first", samples["end"])
    print(f"{'process':>18} {'RSS @' + format(first['tokens'], ','):>16} {'RSS @' + format(tokens, ','):>16} "
          f"{'peak @' + format(first['tokens'], ','):>16} {'peak @end':>12}")
    for proc in ("driver", *STAGES):
        (a, pa), (b, pb) = first[proc], samples["end"][proc]
        print(f"{proc:>18} {a / MB:13.0f} MB {b / MB:13.0f} MB {pa / MB:13.0f} MB {pb / MB:9.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
