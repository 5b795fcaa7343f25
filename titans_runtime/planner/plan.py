"""The memory plan: per stage, named line items against the stage's budget, a verdict, the limits."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

from titans_runtime.config import TitansConfig
from titans_runtime.errors import ConfigError, InputError
from titans_runtime.planner.estimate import STAGES, stage_items
from titans_runtime.planner.hardware import GIB, HardwareConfig

CONTEXT_ITEM = "CUDA context + workspaces"
RESERVE_ITEM = "allocator reserve (fragmentation)"
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32", "fp64": "float64", "float64": "float64"}
MAX_STREAMS = 1 << 16
MAX_SEGMENT = 1 << 20


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


@dataclass
class StagePlan:
    name: str
    device: int
    budget_bytes: int
    items: dict[str, int]   # named line items, bytes; the last two are the context and allocator reserve

    @property
    def total_bytes(self) -> int:
        return sum(self.items.values())

    @property
    def tensor_bytes(self) -> int:
        """What the stage's tensors take (what a traced or measured allocator peak compares with)."""
        return sum(v for k, v in self.items.items() if k not in (CONTEXT_ITEM, RESERVE_ITEM))

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def largest_item(self) -> tuple[str, int]:
        """The largest item that the streams, the segment length or the mode change (not the weights)."""
        fixed = (CONTEXT_ITEM, RESERVE_ITEM)
        movable = {k: v for k, v in self.items.items() if k not in fixed and not k.startswith("weights")}
        return max((movable or self.items).items(), key=lambda kv: kv[1])


@dataclass
class Plan:
    model: str
    hardware: str
    variant: str
    dtype: str
    streams: int
    segment_len: int
    in_flight: int
    train: bool
    checkpointing: bool
    stages: dict[str, StagePlan]
    largest_streams: int | None = None       # most concurrent streams that fit at this segment length
    largest_segment_len: int | None = None   # longest segment that fits with these streams
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(stage.fits for stage in self.stages.values())

    @property
    def overflowing(self) -> list[StagePlan]:
        return [stage for stage in self.stages.values() if not stage.fits]

    def verdict(self) -> str:
        mode = "training" + (" with activation checkpointing" if self.checkpointing else "") if self.train else "inference"
        head = (f"{self.model} ({self.variant}, {self.dtype}, {mode}) on {self.hardware}: "
                f"{self.streams} stream(s) x {self.segment_len}-token segments")
        limits = []
        if self.largest_streams is not None:
            limits.append(f"largest streams that fit at segment {self.segment_len}: {self.largest_streams}")
        if self.largest_segment_len is not None:
            limits.append(f"largest segment that fits with {self.streams} stream(s): {self.largest_segment_len}")
        limit_text = "".join(f"\n  {line}" for line in limits)
        if self.fits:
            tight = min(self.stages.values(), key=lambda s: s.headroom_bytes)
            return (f"FITS: {head}; tightest stage {tight.name} with {gib(tight.headroom_bytes)} GiB headroom."
                    + limit_text)
        lines = []
        for stage in self.overflowing:
            item, size = stage.largest_item
            lines.append(f"stage {stage.name} needs {gib(stage.total_bytes)} GiB of its {gib(stage.budget_bytes)} GiB "
                         f"budget (over by {gib(-stage.headroom_bytes)} GiB); largest item: {item} = {gib(size)} GiB")
        advice = []
        if self.largest_streams:
            advice.append(f"--streams {self.largest_streams}")
        if self.largest_segment_len:
            advice.append(f"--segment-len {self.largest_segment_len}")
        fix = (" or ".join(advice) if advice else "a smaller model, a smaller dtype or a larger budget")
        return (f"DOES NOT FIT: {head}.\n  " + "\n  ".join(lines) + f"\n  to fit, use {fix}" + limit_text)

    # ------------------------------------------------------------------------------------- output
    def table(self):
        from rich.table import Table

        table = Table(title=f"memory plan (GiB): {self.model} on {self.hardware}", show_lines=False)
        table.add_column("line item", no_wrap=True)
        for name in self.stages:
            table.add_column(f"{name}\n(GPU {self.stages[name].device})", justify="right")
        names: list[str] = []
        for stage in self.stages.values():
            names += [n for n in stage.items if n not in names and n not in (CONTEXT_ITEM, RESERVE_ITEM)]
        names += [CONTEXT_ITEM, RESERVE_ITEM]
        for name in names:
            table.add_row(name, *(gib(s.items[name]) if name in s.items else "-" for s in self.stages.values()))
        table.add_section()
        table.add_row("total", *(gib(s.total_bytes) for s in self.stages.values()), style="bold")
        table.add_row("budget", *(gib(s.budget_bytes) for s in self.stages.values()))
        table.add_row("headroom", *((f"[green]{gib(s.headroom_bytes)}[/]" if s.fits else f"[red]{gib(s.headroom_bytes)}[/]")
                                    for s in self.stages.values()))
        return table

    def describe(self) -> str:
        """The table and the verdict as plain text (for logs and error messages)."""
        from rich.console import Console

        console = Console(file=io.StringIO(), width=120, record=True, color_system=None)
        console.print(self.table())
        console.print(self.verdict())
        return console.export_text()

    def to_dict(self) -> dict:
        return {
            "model": self.model, "hardware": self.hardware, "variant": self.variant, "dtype": self.dtype,
            "streams": self.streams, "segment_len": self.segment_len, "segments_in_flight": self.in_flight,
            "train": self.train, "activation_checkpointing": self.checkpointing, "fits": self.fits,
            "largest_streams": self.largest_streams, "largest_segment_len": self.largest_segment_len,
            "stages": {name: {"device": s.device, "budget_bytes": s.budget_bytes, "total_bytes": s.total_bytes,
                              "tensor_bytes": s.tensor_bytes, "headroom_bytes": s.headroom_bytes, "fits": s.fits,
                              "items": dict(s.items)} for name, s in self.stages.items()},
            "overflow": [{"stage": s.name, "item": s.largest_item[0]} for s in self.overflowing],
            "verdict": self.verdict(),
        }


def normalise_dtype(dtype: str | None, config: TitansConfig) -> str:
    if dtype is None:
        return config.dtype
    if dtype not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r} (use bf16, fp16 or fp32)")
    return DTYPE_NAMES[dtype]


def _stage_plans(cfg: TitansConfig, hardware: HardwareConfig, streams: int, segment_len: int, in_flight: int,
                 train: bool, checkpointing: bool) -> dict[str, StagePlan]:
    stages = {}
    for name in STAGES:
        items = stage_items(cfg, name, streams, segment_len, in_flight, train, checkpointing)
        tensors = sum(items.values())
        items[CONTEXT_ITEM] = hardware.context_bytes
        items[RESERVE_ITEM] = int(hardware.fragmentation * tensors)
        stages[name] = StagePlan(name, hardware.budget(name).device, hardware.stage_budget_bytes(name), items)
    return stages


def _largest(fits, low: int, high: int, step: int = 1) -> int | None:
    """The largest multiple of step in [low, high] for which fits() holds (fits is monotone)."""
    lo, hi = low // step, high // step
    if lo < 1 or not fits(lo * step):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * step):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def plan_memory(config: TitansConfig, hardware: HardwareConfig, streams: int, segment_len: int | None = None,
                dtype: str | None = None, train: bool = False, checkpointing: bool = False,
                in_flight: int | None = None, search: bool = True) -> Plan:
    """Plan every stage's memory for `streams` concurrent streams cut into `segment_len`-token segments.

    in_flight: segments that may run at once on a stage (default: one per stream, the runtime's worst
    case, since each stage actor serves all in-flight segments concurrently). search: also find the
    largest streams and segment length that fit."""
    if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
        raise InputError(f"streams must be a positive integer, got {streams!r}")
    segment_len = config.attention.segment_len if segment_len is None else segment_len
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise InputError(f"segment length must be a positive integer, got {segment_len!r}")
    in_flight = streams if in_flight is None else in_flight
    if in_flight < 1 or in_flight > streams:
        raise InputError(f"segments in flight must lie in 1..{streams} (streams), got {in_flight}")
    step = config.memory.chunk_size if config.variant == "mac" and config.memory_layers else 1
    if segment_len % step:
        raise InputError(f"segment length {segment_len} must be a multiple of memory.chunk_size ({step}) for MAC")
    try:
        cfg = config.replace(**{"attention.segment_len": segment_len, "dtype": normalise_dtype(dtype, config)})
    except ConfigError as exc:
        raise InputError(str(exc)) from None

    def build(n: int, seg: int, flight: int) -> dict[str, StagePlan]:
        c = cfg if seg == segment_len else cfg.replace(**{"attention.segment_len": seg})
        return _stage_plans(c, hardware, n, seg, flight, train, checkpointing)

    plan = Plan(model=config.name, hardware=hardware.name, variant=cfg.variant, dtype=cfg.dtype, streams=streams,
                segment_len=segment_len, in_flight=in_flight, train=train, checkpointing=checkpointing,
                stages=build(streams, segment_len, in_flight))
    if search:
        def fits(stages: dict[str, StagePlan]) -> bool:
            return all(s.fits for s in stages.values())

        ratio = in_flight / streams
        plan.largest_streams = _largest(
            lambda n: fits(build(n, segment_len, max(1, min(n, round(n * ratio))))), 1, MAX_STREAMS)
        plan.largest_segment_len = _largest(lambda seg: fits(build(streams, seg, in_flight)), step, MAX_SEGMENT, step)
    return plan
