"""`titans-run` / `python launch/run.py`: stream text files through the 3-stage Titans pipeline on Ray.

    titans-run --stream book.txt [--stream more/] [--model DIR|default | --config YAML] [--metrics-out m.jsonl]
               [--state-out DIR] [--resume DIR] [--generate N --prompt TEXT] [--address auto|HOST:PORT]

Without --stream (and --resume) it reads the shipped sample text. Plans memory first (refuses a plan over
budget), then runs the pipeline; one JSON line per segment,
a progress bar, a summary table, optionally the final per-stream states and text generated from them.
Bad input: `error: <one line>` on stderr, exit code 2."""
from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, TextIO

from titans_runtime.errors import InputError, PlanError, TitansError, report_error

STATE_INDEX = "index.json"
STATE_INDEX_FORMAT = "titans-states-v1"
ADDRESS_TIMEOUT_S = 3.0
STATS_EVERY_S = 1.0
SAMPLE_STREAM = Path(__file__).resolve().parents[1] / "assets" / "sample.txt"  # read when no --stream is given


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line (exit 2) like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="titans-run", description=__doc__.split("\n\n")[0])
    p.add_argument("--stream", action="append", default=[], metavar="PATH",
                   help="text file or directory of text files (repeatable); each file is one stream")
    p.add_argument("--model", default=None, metavar="DIR|default",
                   help="model folder (config.yaml + model.safetensors); default: the shipped model")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="instead of --model: a freshly initialised model (random weights, --seed) from "
                        "this model config, for smoke tests and benchmarks")
    p.add_argument("--seed", type=int, default=0, help="seed of --config's random init and of --generate")
    p.add_argument("--segment-len", type=int, default=256, help="tokens per pipeline segment (default 256)")
    p.add_argument("--task-id", type=int, default=0, help="persistent-memory task bank (default 0)")
    p.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                   help="a running Ray cluster (`ray start --head`); default: start a local Ray")
    p.add_argument("--metrics-out", default=None, metavar="FILE.jsonl", help="one JSON line per segment")
    p.add_argument("--state-out", default=None, metavar="DIR", help="save each stream's final state here")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="start each stream from a state saved by --state-out (the text continues it)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="after the run, generate N tokens per stream from its final state")
    p.add_argument("--prompt", default=None, help="text to continue with --generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--memory", choices=("on", "off"), default="on",
                   help="off: reset the long-term memory at every segment (ablation)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="snapshot every stream's state every N segments for crash recovery (0 = off)")
    p.add_argument("--max-in-flight", type=int, default=4, help="segments in the pipeline at once")
    p.add_argument("--threads-per-stage", type=int, default=1, help="torch threads of each stage actor")
    p.add_argument("--work-dir", default=None, help="run folder: Ray temp files, snapshots")
    p.add_argument("--hardware", default=None, metavar="YAML",
                   help="per-stage memory budgets (default configs/hardware/3x3090.yaml)")
    p.add_argument("--dashboard", choices=("on", "off"), default=None,
                   help="Ray dashboard of the local Ray this command starts (default: Ray's default)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a silent stage counts as dead")
    p.add_argument("--single-process", action="store_true",
                   help="run the single-process reference model instead of the pipeline (no Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    return p


# ------------------------------------------------------------------------------------------ checks
def _check_args(args: argparse.Namespace) -> None:
    for name in ("segment_len", "max_in_flight", "threads_per_stage"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("checkpoint_every", "generate"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0")
    if args.config and args.model:
        raise InputError("give --model (trained weights) or --config (random init), not both")
    if not args.stream and not args.resume:
        # The README's first command: the shipped model over the shipped sample text.
        args.stream = [str(SAMPLE_STREAM)]
        print(f"no --stream given: reading the shipped sample text {SAMPLE_STREAM}", file=sys.stderr)
    elif not args.stream and not args.generate:
        raise InputError("no input: --resume DIR needs --stream FILE (to continue) or --generate N")
    if args.generate and not args.prompt:
        raise InputError("--generate needs --prompt TEXT (the text to continue)")
    if args.single_process and args.address:
        raise InputError("--single-process runs without Ray; drop --address")


def check_ray_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Fail fast when no Ray cluster answers at `address` (ray.init would wait a long time)."""
    if address is None:
        return
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise InputError("--address auto: no running Ray cluster found (start one with `ray start --head`)") from None
        except Exception:  # a private API moved: leave the check to ray.init
            return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(f"--address {address!r}: expected auto or HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise InputError(f"no Ray cluster reachable at {address} ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------------ model
def _model_dir(spec: str) -> Path:
    from titans_runtime.model.checkpoint import DEFAULT_MODEL_DIR

    directory = DEFAULT_MODEL_DIR if spec == "default" else Path(spec)
    if not directory.is_dir():
        raise InputError(f"model folder not found: {directory}")
    return directory


def load_model_spec(args: argparse.Namespace):
    """(config, what the Pipeline loads: a model folder path or a TitanModel, folder or None)."""
    import torch

    from titans_runtime.config import load_config
    from titans_runtime.model.checkpoint import CONFIG_FILE
    from titans_runtime.model.titans import TitanModel

    if args.config:
        config = load_config(args.config)
        torch.manual_seed(args.seed)
        return config, TitanModel(config), None
    directory = _model_dir(args.model or "default")
    config = load_config(directory / CONFIG_FILE)
    return config, str(directory), directory


# ------------------------------------------------------------------------------------------ states
def save_states(directory: str | Path, states: dict, meta: dict) -> Path:
    """One safetensors file per stream + index.json mapping stream ids to files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = {}
    for i, (stream_id, state) in enumerate(sorted(states.items())):
        name = f"stream-{i:04d}.safetensors"
        state.save(directory / name, meta={"stream": stream_id, **meta})
        entries[stream_id] = {"file": name, "position": state.position}
    index = {"format": STATE_INDEX_FORMAT, **meta, "streams": entries}
    (directory / STATE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return directory


def read_state_index(directory: str | Path) -> dict:
    path = Path(directory) / STATE_INDEX
    if not path.is_file():
        raise InputError(f"--resume {directory}: no {STATE_INDEX} (not a folder written by --state-out)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg})") from None
    if index.get("format") != STATE_INDEX_FORMAT or not isinstance(index.get("streams"), dict):
        raise InputError(f"{path}: not a titans state index")
    return index


def load_resume_states(directory: str | Path, stream_ids: list[str]) -> dict:
    """Saved states for this run's streams. A stream takes the state saved under its id (the path as
    given), else the one saved under a path with the same file name (continue `one/book.txt` with
    `two/book.txt`); one saved state and one stream pair up whatever their names. No streams: all."""
    from titans_runtime.model.state import StreamState

    index = read_state_index(directory)
    saved = index["streams"]
    by_name: dict[str, list[str]] = {}
    for key in saved:
        by_name.setdefault(Path(key).name, []).append(key)
    if not stream_ids:
        wanted = {sid: sid for sid in saved}
    elif len(saved) == 1 and len(stream_ids) == 1:
        wanted = {stream_ids[0]: next(iter(saved))}
    else:
        wanted = {}
        for sid in stream_ids:
            same_name = by_name.get(Path(sid).name, [])
            if sid in saved:
                wanted[sid] = sid
            elif len(same_name) == 1:
                wanted[sid] = same_name[0]
            else:
                raise InputError(f"--resume {directory}: no saved state for stream {sid!r} "
                                 f"(saved: {', '.join(sorted(saved))})")
    return {sid: StreamState.load(Path(directory) / saved[key]["file"]) for sid, key in wanted.items()}


# ------------------------------------------------------------------------------------------ results
def result_record(result) -> dict:
    """The JSON line of one segment (NaN, e.g. a stream's lone last token, becomes null)."""
    def clean(x: float) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

    return {
        "stream": result.stream, "seq_no": result.seq_no,
        "token_start": result.token_start, "token_end": result.token_end,
        "loss": clean(result.loss), "bits_per_token": clean(result.bits_per_token),
        "surprise": [clean(s) for s in result.surprise],
        "knowledge_attention": clean(result.knowledge_attention),
        "stage_ms": {k: round(float(v), 3) for k, v in result.stage_ms.items()},
        "n_predicted": result.n_predicted,
    }


def drive(pipe, streams: list, resume: dict | None, on_result: Iterable[Callable],
          on_stats: Iterable[Callable] = (), stats_every_s: float = STATS_EVERY_S) -> None:
    """Pull results from the pipeline, hand each to every `on_result(result)`, and every few seconds
    hand `on_stats(in_flight, stage_stats)` the stages' statistics. Keeps nothing per segment."""
    on_result, on_stats = list(on_result), list(on_stats)
    last_stats = time.monotonic()
    for result in pipe.run(streams, resume=resume):
        for callback in on_result:
            callback(result)
        now = time.monotonic()
        if on_stats and now - last_stats >= stats_every_s:
            last_stats = now
            stats = pipe.stage_stats()
            for callback in on_stats:
                callback(pipe.in_flight, stats)
    if on_stats:
        stats = pipe.stage_stats()
        for callback in on_stats:
            callback(pipe.in_flight, stats)


def _total_tokens(streams: list) -> int | None:
    """Known in advance for the byte tokenizer (one token per byte); else unknown (no ETA)."""
    counts = [s.n_tokens for s in streams]
    return None if any(c is None for c in counts) else sum(counts)


# ------------------------------------------------------------------------------------------ run
def _plan(config, args, out: TextIO):
    """The pipeline's memory plan, as the Pipeline computes it (one stream state per segment in flight);
    over budget: the table on stdout and a one-line error."""
    try:
        from titans_runtime.planner import load_hardware, plan_memory
    except ImportError:  # the planner is not installed in this checkout: the pipeline skips it too
        return None
    plan = plan_memory(config, load_hardware(args.hardware), streams=args.max_in_flight,
                       segment_len=args.segment_len, dtype=config.dtype)
    if not plan.fits:
        print(plan.describe(), file=out)
        over = [name for name, s in plan.stages.items() if s.total_bytes > s.budget_bytes]
        raise PlanError(f"memory plan over budget on stage {', '.join(over) or '?'} (table above): "
                        "lower --segment-len or --max-in-flight, or use a smaller model")
    return plan


def _open_pipeline(model_spec, args, plan):
    if args.single_process:
        from titans_runtime.cli.single_process import SingleProcessRunner
        from titans_runtime.model.checkpoint import load_model

        model = model_spec if not isinstance(model_spec, str) else load_model(model_spec)
        return SingleProcessRunner(model, memory_off=args.memory == "off", task_id=args.task_id)
    from titans_runtime.runtime.pipeline import Pipeline, PipelineOptions

    options = dict(segment_len=args.segment_len, max_in_flight=args.max_in_flight,
                   checkpoint_every=args.checkpoint_every, memory_off=args.memory == "off",
                   task_id=args.task_id, address=args.address, timeout_s=args.timeout,
                   threads_per_stage=args.threads_per_stage, hardware=args.hardware,
                   include_dashboard=None if args.dashboard is None else args.dashboard == "on")
    if args.work_dir:
        options["work_dir"] = args.work_dir
    return Pipeline(model_spec, PipelineOptions(**options))


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    _check_args(args)
    config, model_spec, model_dir = load_model_spec(args)
    if not 0 <= args.task_id < config.persistent.n_tasks:
        raise InputError(f"unknown task id {args.task_id} (this model has task ids 0..{config.persistent.n_tasks - 1})")

    from titans_runtime.model.tokenizer import load_tokenizer
    from titans_runtime.runtime.streams import open_streams

    tokenizer = load_tokenizer(config.tokenizer, base_dir=str(model_dir) if model_dir else None)
    streams = open_streams(args.stream, tokenizer, args.segment_len) if args.stream else []
    resume = load_resume_states(args.resume, [s.stream_id for s in streams]) if args.resume else None
    plan = None if args.single_process else _plan(config, args, out)
    planned = {} if plan is None else {k: (s.total_bytes, s.budget_bytes) for k, s in plan.stages.items()}
    check_ray_address(args.address)

    final_states = dict(resume or {})
    if streams:
        final_states.update(_stream_all(args, model_spec, plan, planned, streams, resume, tokenizer, config, out, err))
    if args.state_out:
        save_states(args.state_out, final_states, meta={"model": str(model_dir or args.config),
                                                        "segment_len": args.segment_len})
        print(f"saved {len(final_states)} stream state(s) to {args.state_out}", file=out)
    if args.generate:
        _generate(args, model_spec, tokenizer, final_states, out)
    return 0


def _stream_all(args, model_spec, plan, planned, streams, resume, tokenizer, config, out, err) -> dict:
    from titans_runtime.cli.summary import RunSummary
    from titans_runtime.runtime.progress import ProgressReporter

    summary = RunSummary([s.stream_id for s in streams])
    progress = ProgressReporter(_total_tokens(streams), stream=err, enabled=not args.no_progress)
    metrics_file = _open_for_writing(args.metrics_out) if args.metrics_out else None
    opened = time.monotonic()
    try:
        with _open_pipeline(model_spec, args, plan) as pipe:
            started = time.monotonic()  # start-up (Ray, actors, process group) is reported apart
            metrics = _dashboard_metrics()
            memory_layers = config.memory_layers

            def on_result(result) -> None:
                summary.add(result)
                progress.update(result.token_end - result.token_start, pipe.in_flight)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(result_record(result)) + "\n")
                if metrics is not None:
                    metrics.record_segment(result, memory_layers)

            last_stats: dict = {}

            def on_stats(in_flight: int, stats: dict) -> None:
                last_stats.clear()
                last_stats.update(stats)
                if metrics is not None:
                    metrics.record_pipeline(in_flight, stats, {k: b for k, (_, b) in planned.items()})

            drive(pipe, streams, resume, [on_result], [on_stats])
            states = pipe.final_states()
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()
    summary.print(out, last_stats, planned, time.monotonic() - started, startup_s=started - opened)
    return states


def _open_for_writing(path: str) -> TextIO:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", buffering=1)  # line-buffered: `tail -f` sees each segment
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _dashboard_metrics():
    """Dashboard metrics when Ray runs (the pipeline started or joined it); None otherwise."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    from titans_runtime.runtime.metrics import RuntimeMetrics

    return RuntimeMetrics()


def _generate(args, model_spec, tokenizer, states: dict, out: TextIO) -> None:
    from titans_runtime.generate import generate
    from titans_runtime.model.checkpoint import load_model

    model = load_model(model_spec) if isinstance(model_spec, str) else model_spec
    model.eval()
    prompt_ids = tokenizer.encode(args.prompt)
    for stream_id, state in sorted(states.items()):
        ids, _ = generate(model, state, prompt_ids, args.generate, temperature=args.temperature,
                          top_k=args.top_k or None, seed=args.seed, task_id=args.task_id)
        print(f"--- generated from {stream_id} ---", file=out)
        print(args.prompt + tokenizer.decode(ids), file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except TitansError as exc:  # a plan table goes to stdout, the one-line verdict to stderr
        return report_error(exc)
    except ConnectionError as exc:  # ray.init found no cluster
        print(f"error: no Ray cluster reachable: {str(exc).splitlines()[0] if str(exc) else exc!r}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
