"""Hardware budgets as data: the devices of a box and each pipeline stage's share of one of them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from titans_runtime.dataconf import from_dict, read_yaml
from titans_runtime.errors import ConfigError

STAGES = ("core", "long_term_memory", "persistent_memory")
GIB = 1 << 30
MIB = 1 << 20
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_HARDWARE = CONFIG_DIR / "hardware" / "3x3090.yaml"


@dataclass
class DeviceConfig:
    name: str = "GPU"
    memory_gib: float = 24.0

    def validate(self, path: str = "") -> None:
        if self.memory_gib <= 0:
            raise ConfigError(f"{path}.memory_gib: must be positive, got {self.memory_gib}")


@dataclass
class StageBudget:
    device: int = 0          # index into `devices`
    budget_gib: float = 21.0  # the most this stage's process may hold on its device, context included

    def validate(self, path: str = "") -> None:
        if self.device < 0:
            raise ConfigError(f"{path}.device: must be >= 0, got {self.device}")
        if self.budget_gib <= 0:
            raise ConfigError(f"{path}.budget_gib: must be positive, got {self.budget_gib}")


@dataclass
class StageBudgets:
    core: StageBudget = field(default_factory=StageBudget)
    long_term_memory: StageBudget = field(default_factory=StageBudget)
    persistent_memory: StageBudget = field(default_factory=StageBudget)


@dataclass
class HardwareConfig:
    """A box: its devices, one budget per stage, and what each process needs beyond its tensors."""

    name: str = "hardware"
    devices: list[DeviceConfig] = field(default_factory=lambda: [DeviceConfig()])
    stages: StageBudgets = field(default_factory=StageBudgets)
    cuda_context_mib: float = 512.0   # per process: CUDA context + cuBLAS/cuDNN workspaces (outside the allocator)
    fragmentation: float = 0.05       # caching-allocator slack, as a fraction of the planned tensor bytes

    def validate(self, path: str = "") -> None:
        if not self.devices:
            raise ConfigError("devices: at least one device is needed")
        if self.cuda_context_mib < 0:
            raise ConfigError(f"cuda_context_mib: must be >= 0, got {self.cuda_context_mib}")
        if not 0 <= self.fragmentation < 1:
            raise ConfigError(f"fragmentation: must lie in [0, 1), got {self.fragmentation}")
        shared: dict[int, float] = {}
        for stage in STAGES:
            budget = self.budget(stage)
            if budget.device >= len(self.devices):
                raise ConfigError(f"stages.{stage}.device: no device {budget.device} "
                                  f"(the box has {len(self.devices)})")
            device = self.devices[budget.device]
            if budget.budget_gib > device.memory_gib:
                raise ConfigError(f"stages.{stage}.budget_gib: {budget.budget_gib:g} GiB is above the "
                                  f"{device.memory_gib:g} GiB of device {budget.device} ({device.name})")
            shared[budget.device] = shared.get(budget.device, 0.0) + budget.budget_gib
        for index, total in shared.items():
            if total > self.devices[index].memory_gib + 1e-9:
                raise ConfigError(f"stages: budgets on device {index} add up to {total:g} GiB, above its "
                                  f"{self.devices[index].memory_gib:g} GiB")

    def budget(self, stage: str) -> StageBudget:
        if stage not in STAGES:
            raise ConfigError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        return getattr(self.stages, stage)

    def stage_budget_bytes(self, stage: str) -> int:
        return int(self.budget(stage).budget_gib * GIB)

    def device_total_bytes(self, stage: str) -> int:
        """Memory of the device the stage runs on (for torch.cuda.set_per_process_memory_fraction)."""
        return int(self.devices[self.budget(stage).device].memory_gib * GIB)

    def memory_fraction(self, stage: str) -> float:
        """The stage's budget as a fraction of its device (set_per_process_memory_fraction's argument)."""
        return self.stage_budget_bytes(stage) / self.device_total_bytes(stage)

    @property
    def context_bytes(self) -> int:
        return int(self.cuda_context_mib * MIB)


def load_hardware(path: str | Path | None = None) -> HardwareConfig:
    """Load a hardware YAML (None: configs/hardware/3x3090.yaml); errors are one line naming the key."""
    path = Path(path) if path is not None else DEFAULT_HARDWARE
    data = read_yaml(path)
    try:
        return from_dict(HardwareConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
