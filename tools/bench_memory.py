"""Benchmark: our neural long-term memory (LMM) against titans-pytorch's NeuralMemory, side by side.

Both sides store then retrieve one stream (batch 1, 8k tokens by default) on CPU with the same number of
threads, the same width, heads, chunk size and memory-MLP depth/width, per-token data-dependent step
size, momentum and forgetting, SiLU q/k/v and normalised q/k, no conv (titans-pytorch's NeuralMemory has
none). Two semantics, each implementation configured to it:
  per-chunk  gradients re-anchored after every chunk (exact mini-batch gradient descent):
             ours anchor_every=1 (our default), titans-pytorch batch_size=chunk_size;
  per-call   every chunk's gradient taken at the weights the call started with, reads still at the
             weights updated chunk by chunk: ours anchor_every=tokens/chunk, titans-pytorch's default.
For each: tokens/s (median of repeats after warm-up, runs interleaved so every side sees the same
machine load) and the peak of torch CPU allocator bytes during the call, forward-only under
torch.no_grad() (inference) and forward+backward (training), and our ratios at the same semantics.

titans-pytorch is never a dependency of the project; install it into the benchmark's environment only:
    python -m pip install titans-pytorch==0.5.5 torch==2.13.0
(pinning torch keeps pip from replacing the CPU build.)

    python tools/bench_memory.py                    # memory settings of configs/tiny.yaml
    python tools/bench_memory.py --dim 512 --heads 8 --chunk 64
    python tools/bench_memory.py --profile          # where our time goes (torch.profiler, top ops)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from titans_runtime.config import MemoryConfig, load_config
from titans_runtime.errors import TitansError, report_error
from titans_runtime.model.neural_memory import NeuralMemory
from titans_runtime.model.titans import TitanModel

ROOT = Path(__file__).resolve().parents[1]
PEER_INSTALL = f"{sys.executable} -m pip install titans-pytorch==0.5.5 torch==2.13.0"
PEER_VERSION = "0.5.5"
MIB = 2.0**20


@dataclasses.dataclass(frozen=True)
class Setting:
    """What both implementations share."""

    dim: int
    heads: int
    chunk: int
    depth: int
    hidden_mult: float
    tokens: int
    memory: MemoryConfig  # ours, conv off

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# --------------------------------------------------------------------------------------------- peer
def import_peer():
    """titans_pytorch, or a one-line error that says how to install it for this benchmark only."""
    try:
        import titans_pytorch
        from importlib.metadata import version
    except ImportError:
        raise TitansError(f"titans-pytorch is not installed; for this benchmark only run: {PEER_INSTALL}") from None
    found = version("titans-pytorch")
    if found != PEER_VERSION:
        print(f"warning: titans-pytorch {found} found, the benchmark was written against {PEER_VERSION}")
    return titans_pytorch


def make_peer(setting: Setting, anchor_every_chunk: bool) -> nn.Module:
    """titans-pytorch's NeuralMemory configured to our semantics (see the module docstring)."""
    titans_pytorch = import_peer()
    from titans_pytorch.memory_models import MemoryMLP

    class SiLUMemoryMLP(MemoryMLP):
        """Its MemoryMLP (same weight layout, per head) with our SiLU in place of its GELU."""

        def forward(self, x):
            for i, weight in enumerate(self.weights):
                if i > 0:
                    x = F.silu(x)
                x = x @ weight
            return x

    cfg = setting.memory
    return titans_pytorch.NeuralMemory(
        dim=setting.dim,
        dim_head=setting.head_dim,
        heads=setting.heads,
        chunk_size=setting.chunk,
        batch_size=setting.chunk if anchor_every_chunk else None,
        model=SiLUMemoryMLP(setting.head_dim, depth=setting.depth, expansion_factor=setting.hidden_mult),
        mem_model_norm_add_residual=False,  # ours is the plain MLP
        pre_rmsnorm=False,                  # ours has no pre-norm
        qk_rmsnorm=True,                    # normalised q/k (theirs: RMS norm, ours: L2 norm)
        activation=nn.SiLU(),               # SiLU q/k/v projections like ours
        momentum=True,
        default_step_transform_max_lr=cfg.theta_max,
        init_adaptive_step_bias=_logit(cfg.theta_init / cfg.theta_max),
        init_momentum_bias=_logit(cfg.eta_init),
        init_decay_bias=_logit(cfg.alpha_init),
    )


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# -------------------------------------------------------------------------------------------- calls
SEMANTICS = ("per-chunk", "per-call")


def ours_memory_config(setting: Setting, semantics: str) -> MemoryConfig:
    """per-chunk: exact mini-batch descent; per-call: one gradient anchor for the whole call."""
    anchor_every = 1 if semantics == "per-chunk" else setting.tokens // setting.chunk
    return dataclasses.replace(setting.memory, anchor_every=anchor_every)


def ours_call(memory: NeuralMemory) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        out, _surprise, _state = memory.update_and_retrieve(x, memory.initial_state(x.shape[0]))
        return out

    return call


def peer_call(memory: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        out, _state = memory(x)
        return out

    return call


def run_once(module: nn.Module, call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, train: bool) -> None:
    """One store+retrieve over the stream; training adds the backward into every parameter.

    The parameters' .grad are dropped first, so that they are allocated inside the run on both sides."""
    module.zero_grad(set_to_none=True)
    if train:
        call(x).square().mean().backward()
    else:
        with torch.no_grad():
            call(x)


def seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_call(module: nn.Module, call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             train: bool) -> Callable[[], None]:
    return lambda: run_once(module, call, x, train)


def peak_allocated_bytes(fn: Callable[[], None]) -> int:
    """Peak of live torch CPU allocator bytes during fn, above what was live before it.

    torch.profiler(profile_memory=True) records every allocation and free of the CPU allocator (size and
    time); the running sum's maximum is the peak. It sees every tensor both implementations allocate,
    including kernel-internal temporaries and autograd's saved tensors, and nothing else (tracemalloc
    misses torch's allocations; RSS mixes in the allocator's and Python's own behaviour)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------------------ benches
def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Result:
    name: str
    mode: str
    tokens_per_s: float
    peak_bytes: int


def bench_memories(setting: Setting, repeats: int, warmup: int, seed: int) -> list[Result]:
    sides: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for semantics in SEMANTICS:
        torch.manual_seed(seed)
        ours = NeuralMemory(setting.dim, ours_memory_config(setting, semantics))
        sides[f"ours {semantics}"] = (ours, ours_call(ours))
        peer = make_peer(setting, anchor_every_chunk=semantics == "per-chunk")
        sides[f"titans-pytorch {semantics}"] = (peer, peer_call(peer))
    x = torch.randn(1, setting.tokens, setting.dim)
    results = []
    for mode, train in (("inference", False), ("training", True)):
        runs = {name: run_call(module, call, x, train) for name, (module, call) in sides.items()}
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(repeats):  # interleaved: a load spike on the shared machine hits every side
            for name, fn in runs.items():
                times[name].append(seconds(fn))
                progress(f"{mode} repeat {rep + 1}/{repeats} {name}: {times[name][-1]:.2f} s")
        for name, fn in runs.items():
            sides[name][0].zero_grad(set_to_none=True)  # no free of an earlier .grad inside the profile
            tps = setting.tokens / statistics.median(times[name])
            results.append(Result(name, mode, tps, peak_allocated_bytes(fn)))
    return results


def bench_tiny_model(config_path: Path, tokens: int, segment: int, repeats: int, warmup: int, seed: int) -> float:
    """Tokens/s of the full model forward over a stream fed in segments, carrying the state."""
    torch.manual_seed(seed)
    model = TitanModel(load_config(config_path)).eval()
    ids = torch.randint(0, model.config.model.vocab_size, (1, tokens))

    def stream() -> None:
        with torch.no_grad():
            state = model.initial_state(1)
            for start in range(0, tokens, segment):
                state = model(ids[:, start:start + segment], state=state).state

    for _ in range(warmup):
        stream()
    return tokens / statistics.median(seconds(stream) for _ in range(repeats))


def profile_ours(setting: Setting, seed: int, top: int) -> None:
    """Where our LMM's time goes: torch.profiler's top ops by self CPU time, inference and training."""
    x = torch.randn(1, setting.tokens, setting.dim)
    for semantics in SEMANTICS:
        torch.manual_seed(seed)
        ours = NeuralMemory(setting.dim, ours_memory_config(setting, semantics))
        call = ours_call(ours)
        for mode, train in (("inference", False), ("training", True)):
            run_once(ours, call, x, train)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_once(ours, call, x, train)
            print(f"\n--- our LMM {semantics}, {mode}: top {top} ops by self CPU time ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


# ------------------------------------------------------------------------------------------- report
def report(setting: Setting, results: list[Result], threads: int) -> None:
    print(f"LMM store+retrieve, CPU, {threads} thread(s), batch 1, {setting.tokens} tokens; dim {setting.dim}, "
          f"heads {setting.heads} (head dim {setting.head_dim}), chunk {setting.chunk}, memory MLP depth "
          f"{setting.depth} x{setting.hidden_mult:g} hidden, momentum+decay on, conv off")
    header = (f"{'mode':<10} {'semantics':<10} {'implementation':<15} {'tokens/s':>10} {'peak MiB':>10} "
              f"{'ours speed-up':>14} {'ours/its peak':>14}")
    print(header)
    print("-" * len(header))
    by_key = {(r.mode, r.name): r for r in results}
    for mode in ("inference", "training"):
        for semantics in SEMANTICS:
            ours, peer = by_key[(mode, f"ours {semantics}")], by_key[(mode, f"titans-pytorch {semantics}")]
            for r in (ours, peer):
                impl = r.name.split(" ")[0]
                speed = f"{ours.tokens_per_s / peer.tokens_per_s:.2f}x" if r is peer else ""
                mem = f"{ours.peak_bytes / peer.peak_bytes:.3f}" if r is peer else ""
                print(f"{mode:<10} {semantics:<10} {impl:<15} {r.tokens_per_s:>10.0f} "
                      f"{r.peak_bytes / MIB:>10.1f} {speed:>14} {mem:>14}")
    print("target (issue 2): ours >= 3x faster and <= 1/4 of the peak memory, at the same semantics:")
    for mode in ("inference", "training"):
        for semantics in SEMANTICS:
            ours, peer = by_key[(mode, f"ours {semantics}")], by_key[(mode, f"titans-pytorch {semantics}")]
            speed, mem = ours.tokens_per_s / peer.tokens_per_s, ours.peak_bytes / peer.peak_bytes
            print(f"  {mode:<10} {semantics:<10} speed {speed:5.2f}x ({'met' if speed >= 3 else 'NOT met'}), "
                  f"peak {mem:.3f} ({'met' if mem <= 0.25 else 'NOT met'})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml",
                   help="model config whose memory settings are benchmarked (default configs/tiny.yaml)")
    p.add_argument("--dim", type=int, help="memory width = input width (default: the config's)")
    p.add_argument("--heads", type=int, help="memory heads (default: the config's)")
    p.add_argument("--chunk", type=int, help="chunk size (default: the config's)")
    p.add_argument("--depth", type=int, help="memory MLP depth (default: the config's)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--segment", type=int, default=512, help="segment length of the full-model stream")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-model", action="store_true", help="skip the full tiny-model forward")
    p.add_argument("--skip-memory", action="store_true", help="skip the LMM comparison (full model only)")
    p.add_argument("--profile", action="store_true", help="also print where our LMM's time goes")
    p.add_argument("--top", type=int, default=20, help="ops listed by --profile")
    return p.parse_args(argv)


def make_setting(args: argparse.Namespace) -> Setting:
    config = load_config(args.config)
    mem = config.memory
    dim = args.dim or mem.dim or config.model.dim
    mem = dataclasses.replace(
        mem, dim=dim, heads=args.heads or mem.heads, chunk_size=args.chunk or mem.chunk_size,
        depth=args.depth or mem.depth, conv_kernel=0,
    )
    mem.validate("memory")
    for name in ("tokens", "threads", "repeats", "segment"):
        if getattr(args, name) <= 0:
            raise TitansError(f"--{name} must be positive")
    if args.tokens % mem.chunk_size:
        raise TitansError(f"--tokens {args.tokens} is not a multiple of the chunk size {mem.chunk_size}")
    return Setting(dim, mem.heads, mem.chunk_size, mem.depth, mem.hidden_mult, args.tokens, mem)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        setting = make_setting(args)
        if not args.skip_memory:
            import_peer()
    except TitansError as exc:
        return report_error(exc)
    torch.set_num_threads(args.threads)
    if not args.skip_memory:
        results = bench_memories(setting, args.repeats, args.warmup, args.seed)
        report(setting, results, args.threads)
    if not args.skip_model:
        tps = bench_tiny_model(args.config, args.tokens, args.segment, args.repeats, args.warmup, args.seed)
        print(f"full model forward ({args.config.name}, TitanModel, no_grad, {args.threads} thread(s)): {args.tokens} "
              f"tokens in segments of {args.segment} carrying state: {tps:.0f} tokens/s")
    if args.profile:
        profile_ours(setting, args.seed, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
