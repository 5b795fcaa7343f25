"""On a GPU: the planner's bytes per stage beside torch.cuda.max_memory_allocated of the same stage
computations run for real (the ones tests/test_planner.py traces on fake tensors), and a check that the
model gives the same logits on CUDA as on CPU.

    python tools/gpu_plan_check.py                       # tiny + llama-7b-{mac,mag,mal}, inference and training
    python tools/gpu_plan_check.py --config configs/llama-7b-mac.yaml --streams 4

Tensors the stage code creates with torch.empty are zero-filled here (a sampled token needs finite logits);
memory is the same either way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import titans_runtime.planner.trace as trace  # noqa: E402
from titans_runtime.config import load_config  # noqa: E402
from titans_runtime.model.titans import TitanModel  # noqa: E402
from titans_runtime.planner import load_hardware, plan_memory  # noqa: E402

GIB = 1 << 30


class CudaTrace:
    """FakeTrace's interface (live, peak, reset_peak) over the CUDA caching allocator's counters."""

    def __enter__(self) -> "CudaTrace":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.set_default_device("cuda")
        return self

    @property
    def live(self) -> int:
        return torch.cuda.memory_allocated() - self.base

    @property
    def peak(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base

    def reset_peak(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def __exit__(self, *exc: object) -> None:
        torch.set_default_device(None)


def zero_filled(make, like: bool = False):  # type: ignore[no-untyped-def]
    def make_zeros(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not like and kwargs.get("device") is None:  # the default-device mode knows only the original
            kwargs["device"] = torch.get_default_device()
        with torch.no_grad():  # a leaf that requires grad may be filled in place here
            return make(*args, **kwargs).zero_()
    return make_zeros


def check_logits() -> None:
    torch.manual_seed(0)
    for variant in ("mac", "mag", "mal"):
        cfg = load_config(ROOT / "configs" / "tiny.yaml").replace(variant=variant)
        model = TitanModel(cfg).eval()
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 300))
        with torch.no_grad():
            cpu = model(tokens).logits
            gpu = model.to("cuda")(tokens.cuda()).logits.cpu()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = model(tokens.cuda()).logits.float().cpu()
        print(f"logits {variant}: max |cuda - cpu| {float((gpu - cpu).abs().max()):.2e} (fp32), "
              f"bf16 autocast finite {bool(torch.isfinite(bf16).all())}, max |bf16 - cpu| {float((bf16 - cpu).abs().max()):.2e}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--streams", type=int, default=2)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    check_logits()
    trace.FakeTrace = CudaTrace  # the same stage computations, on the GPU for real
    torch.empty, torch.empty_like = zero_filled(torch.empty), zero_filled(torch.empty_like, like=True)
    configs = args.config or [str(ROOT / "configs" / n) for n in
                              ("tiny.yaml", "llama-7b-mac.yaml", "llama-7b-mag.yaml", "llama-7b-mal.yaml")]
    for path in configs:
        cfg = load_config(path)
        for train in (False, True):
            plan = plan_memory(cfg, load_hardware(None), args.streams, train=train, in_flight=1, search=False)
            cells = []
            for stage in trace.STAGES:
                planned = plan.stages[stage].tensor_bytes
                measured = trace.traced_peak(cfg, stage, args.streams, train, scale=False).peak
                cells.append(f"{stage} {planned / GIB:.3f}/{measured / GIB:.3f} GiB ({(planned - measured) / measured:+.1%})")
                torch.cuda.empty_cache()
            print(f"{cfg.name} {'training' if train else 'inference'} planned/max_memory_allocated: " + " | ".join(cells),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
