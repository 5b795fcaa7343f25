"""Planned vs traced memory per stage: the planner's bytes beside the peak of the real stage computations
traced on fake tensors (no real memory is used, so LLaMA-7B shapes run on a laptop).

    python tools/plan_vs_trace.py                                   # llama-7b-{mac,mag,mal}, inference + training
    python tools/plan_vs_trace.py --config configs/tiny.yaml --streams 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from titans_runtime.config import load_config  # noqa: E402
from titans_runtime.planner import load_hardware, plan_memory  # noqa: E402
from titans_runtime.planner.trace import STAGES, traced_peak  # noqa: E402

GIB = 1 << 30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None, help="model config (repeatable)")
    p.add_argument("--streams", type=int, default=2, help="stream states resident (one segment in flight)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    configs = args.config or [str(ROOT / "configs" / f"llama-7b-{v}.yaml") for v in ("mac", "mag", "mal")]
    print(f"{'config':<14} {'mode':<10} " + " ".join(f"{s + ' planned/traced GiB':>40}" for s in STAGES))
    for path in configs:
        cfg = load_config(path)
        for train in (False, True):
            plan = plan_memory(cfg, load_hardware(None), args.streams, train=train, in_flight=1, search=False)
            cells = []
            for stage in STAGES:
                planned, traced = plan.stages[stage].tensor_bytes, traced_peak(cfg, stage, args.streams, train).peak
                cells.append(f"{planned / GIB:.3f} / {traced / GIB:.3f} ({(planned - traced) / traced:+.1%})")
            print(f"{cfg.name:<14} {'training' if train else 'inference':<10} " + " ".join(f"{c:>40}" for c in cells),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
