"""`optimize_memory_distribution`: the per-GPU split of a box's memory among the three stages."""
from __future__ import annotations

from pathlib import Path

from titans_runtime.config import TitansConfig, load_config
from titans_runtime.errors import InputError
from titans_runtime.planner.estimate import STAGES
from titans_runtime.planner.hardware import CONFIG_DIR, GIB, DeviceConfig, HardwareConfig, StageBudget, StageBudgets
from titans_runtime.planner.plan import plan_memory

DEFAULT_MODEL = CONFIG_DIR / "llama-7b-mac.yaml"
HEADROOM = 1 / 12  # of each device, left to the driver and other processes (2 GiB of a 24 GiB card)


def optimize_memory_distribution(total_vram: float, n_gpus: int, batch_size: int, seq_length: int,
                                 config: TitansConfig | str | Path | None = None) -> dict:
    """Split `total_vram` GiB over `n_gpus` equal GPUs among the core, long-term and persistent memory
    stages for `batch_size` concurrent streams of `seq_length`-token segments (default model:
    configs/llama-7b-mac.yaml). Stages go round-robin on the GPUs; each GPU's usable memory (all but
    1/12) is shared by its stages in proportion to what the planner says they need.

    Returns {"fits", "per_gpu": [{"gpu", "memory_gib", "stages": {stage: {"planned_gib", "budget_gib"}}}],
    "plan": the planner's dict for the resulting budgets}."""
    if total_vram <= 0 or n_gpus < 1:
        raise InputError(f"need a positive total_vram and n_gpus >= 1, got {total_vram} GiB over {n_gpus} GPUs")
    if not isinstance(config, TitansConfig):
        config = load_config(config or DEFAULT_MODEL)
    per_gpu = total_vram / n_gpus
    device_of = {stage: i % n_gpus for i, stage in enumerate(STAGES)}
    # First pass: what each stage needs, with every budget set to a whole GPU.
    probe = HardwareConfig(name=f"{n_gpus}x{per_gpu:g}GiB", devices=[DeviceConfig(memory_gib=per_gpu)] * n_gpus,
                           stages=StageBudgets(**{s: StageBudget(device_of[s], per_gpu) for s in STAGES}))
    need = plan_memory(config, probe, batch_size, seq_length, search=False)
    budgets = {}
    for gpu in range(n_gpus):
        on_gpu = [s for s in STAGES if device_of[s] == gpu]
        usable = per_gpu * (1 - HEADROOM)
        total_need = sum(need.stages[s].total_bytes for s in on_gpu) or 1
        for s in on_gpu:
            budgets[s] = round(usable * need.stages[s].total_bytes / total_need, 2)
    hardware = HardwareConfig(name=probe.name, devices=probe.devices,
                              stages=StageBudgets(**{s: StageBudget(device_of[s], budgets[s]) for s in STAGES}))
    hardware.validate()
    plan = plan_memory(config, hardware, batch_size, seq_length, search=False)
    return {
        "fits": plan.fits,
        "per_gpu": [{"gpu": gpu, "memory_gib": per_gpu,
                     "stages": {s: {"planned_gib": round(plan.stages[s].total_bytes / GIB, 2), "budget_gib": budgets[s]}
                                for s in STAGES if device_of[s] == gpu}} for gpu in range(n_gpus)],
        "plan": plan.to_dict(),
    }
