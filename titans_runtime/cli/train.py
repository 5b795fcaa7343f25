"""`titans-train` / `python launch/train.py`: train a Titans model from a YAML training config.

    titans-train --config configs/train/text_mix.yaml --out runs/text_mix
    titans-train --config configs/train/text_mix.yaml --out runs/text_mix --resume
    titans-train --config configs/train/finetune.yaml --init models/llama --train memory,persistent
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from titans_runtime.errors import TitansError, report_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="titans-train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training config YAML (configs/train/*.yaml)")
    p.add_argument("--out", required=True, help="run folder: log.jsonl and checkpoint/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--init", help="start from this model folder (e.g. a converted LLaMA) instead of scratch")
    p.add_argument("--train", help="parameter groups that learn, e.g. memory,persistent (core, memory, persistent, gates)")
    p.add_argument("--data", action="append", help="text file or folder (repeatable; replaces data.files)")
    p.add_argument("--steps", type=int, help="total optimiser steps (replaces steps)")
    p.add_argument("--stop-at", type=int, help="stop (and checkpoint) after this step; the schedule keeps --steps")
    p.add_argument("--max-minutes", type=float, help="stop (and checkpoint) after this much wall time")
    p.add_argument("--export", help="also save_model the weights here at every checkpoint (e.g. the default model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except TitansError as exc:
        return report_error(exc)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from titans_runtime.errors import ConfigError, InputError
    from titans_runtime.training.config import load_train_config, parse_groups
    from titans_runtime.training.loop import Trainer

    config_path = Path(args.config)
    cfg = load_train_config(config_path)
    if args.init:
        cfg.init = args.init
    if args.train:
        cfg.train = parse_groups(args.train)
    if args.data:
        cfg.data.files = list(args.data)
    if args.steps is not None:
        if args.steps <= 0:
            raise ConfigError("--steps: must be positive")
        cfg.steps = args.steps
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(args.out)
    if not args.resume and (out / "checkpoint").exists():
        raise InputError(f"{out} already holds a checkpoint: pass --resume, or choose another --out")
    trainer = Trainer(cfg, out, config_path.parent, torch.device(args.device),
                      Path(args.export) if args.export else None)
    if args.resume:
        trainer.resume()
    console = Console(stderr=True)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    console.print(f"model {trainer.model_cfg.name} ({trainer.model_cfg.variant}): {n_params:,} parameters, "
                  f"{n_train:,} trained ({', '.join(cfg.train)}); corpus "
                  f"{sum(t.numel() for t in trainer.corpus.train):,} train / "
                  f"{sum(t.numel() for t in trainer.corpus.heldout):,} held-out tokens; from step {trainer.step}")
    last = min(cfg.steps, args.stop_at) if args.stop_at else cfg.steps
    max_seconds = args.max_minutes * 60 if args.max_minutes else None
    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, disable=args.quiet) as progress:
        task = progress.add_task("train", total=last, completed=trainer.step, info="")

        def on_step(res) -> None:
            info = f"loss {res.loss:.3f} lr {res.lr:.2e}"
            progress.update(task, completed=res.step, info=info)
            if args.quiet and res.step % cfg.log_every == 0:
                console.print(f"step {res.step} {info} {res.seconds:.2f}s/step")

        def on_eval(step: int, metrics: dict) -> None:
            console.print(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

        trainer.run(stop_at=args.stop_at, max_seconds=max_seconds, on_step=on_step, on_eval=on_eval)
    console.print(f"stopped at step {trainer.step} after {trainer.elapsed / 60:.1f} min of training; "
                  f"checkpoint in {trainer.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
