"""`titans-plan`: does a model, a segment length and a number of streams fit the GPUs' budgets?

Exit status: 0 fits, 1 does not fit (the verdict names the stage, the item and what to change),
2 bad input (one line: `error: ...`)."""
from __future__ import annotations

import argparse
import json
import sys

from titans_runtime.errors import TitansError, report_error

DEFAULT_STREAMS = 4  # the runtime's default number of segments (of different streams) in flight


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage too)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="titans-plan", description="Plan each pipeline stage's GPU memory against its budget.")
    p.add_argument("--config", required=True, help="model config YAML (e.g. configs/llama-7b-mac.yaml)")
    p.add_argument("--hardware", default=None, help="hardware budgets YAML (default configs/hardware/3x3090.yaml)")
    p.add_argument("--streams", type=int, default=DEFAULT_STREAMS, help=f"concurrent streams (default {DEFAULT_STREAMS})")
    p.add_argument("--segment-len", type=int, default=None, help="tokens per segment (default: the config's)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="override the model dtype")
    p.add_argument("--train", action="store_true", help="plan training (gradients, AdamW, saved activations)")
    p.add_argument("--checkpointing", action="store_true", help="with --train: activation checkpointing per layer")
    p.add_argument("--in-flight", type=int, default=None,
                   help="segments running at once on a stage (default: one per stream)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # bad arguments (already printed as one line) or --help
        return int(exc.code or 0)
    try:
        from titans_runtime.config import load_config
        from titans_runtime.planner.hardware import load_hardware
        from titans_runtime.planner.plan import plan_memory

        if args.checkpointing and not args.train:
            raise TitansError("--checkpointing needs --train")
        config = load_config(args.config)
        hardware = load_hardware(args.hardware)
        plan = plan_memory(config, hardware, args.streams, args.segment_len, args.dtype, train=args.train,
                           checkpointing=args.checkpointing, in_flight=args.in_flight)
    except TitansError as exc:
        return report_error(exc)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped: wide enough for the stage columns
            console = Console(width=110)
        console.print(plan.table())
        console.print(plan.verdict(), style="green" if plan.fits else "red", highlight=False)
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
