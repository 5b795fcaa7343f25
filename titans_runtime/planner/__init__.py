"""The VRAM planner: per-stage memory plans against the hardware budgets (see `titans-plan`)."""
from titans_runtime.planner.hardware import HardwareConfig, load_hardware
from titans_runtime.planner.plan import Plan, StagePlan, plan_memory
from titans_runtime.planner.split import optimize_memory_distribution

__all__ = ["HardwareConfig", "Plan", "StagePlan", "load_hardware", "optimize_memory_distribution", "plan_memory"]
