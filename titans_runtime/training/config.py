"""The training config (YAML, validated like the model config): model, data, optimiser, TBPTT, cadence."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from titans_runtime.dataconf import from_dict, read_yaml, to_dict
from titans_runtime.errors import ConfigError

PARAM_GROUPS = ("core", "memory", "persistent", "gates")


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=lambda: ["../shared/data/corpora"])  # files or folders
    holdout_fraction: float = 0.1   # the tail of every file is held out for evaluation
    synthetic_fraction: float = 0.5  # share of sequences built from long-range synthetic tasks
    passkey_share: float = 0.5       # of the synthetic ones: pass-key facts (the rest: repeats after a gap)
    shuffled_share: float = 0.0      # of the repeated passages: shuffled text (unpredictable but for memory)
    noise_share: float = 0.0         # of the repeats: random tokens end to end (passage, gap, surroundings)
    noise_alphabet: int = 32         # distinct tokens (drawn from the corpus) a noise sequence uses
    noise_weight: float = 1.0        # loss weight of a noise sequence's repeated passage (its only loss):
                                     # > 1 keeps the recall signal strong beside the text's
    recall_weight: float = 1.0       # loss weight, in text tasks, of the tokens only a memory predicts (a
                                     # repeat's second reading, the pass-key answer)
    context_weight: float = 1.0      # loss weight of the other tokens of text tasks: 0 trains recall alone
                                     # (a curriculum's first stage), 1 is plain language modelling
    passage_min: int = 24            # repeated passage length range (tokens)
    passage_max: int = 96
    # Smallest gap between a passage and its repeat, in attention windows. Gaps shorter than a TBPTT
    # window let the gradient reach the memory writes; longer ones train reading only.
    min_gap_windows: float = 1.0
    # With windows_per_sequence > 1: one task (or text) per TBPTT window, the state carried across them, so
    # the memory learns to recall in a long stream; false: one task spread over the whole sequence.
    task_per_window: bool = False
    # > 0: a synthetic task fills only a sequence's first `task_span` tokens and plain text the rest, so the
    # task starts from a fresh memory (as the recall evaluations do) and the same gradient goes on to train
    # reading a long stream; 0: the task spreads over the whole sequence.
    task_span: int = 0

    def validate(self, path: str = "data") -> None:
        _require(len(self.files) > 0, f"{path}.files", "needs at least one file or folder")
        _require(0.0 < self.holdout_fraction < 1.0, f"{path}.holdout_fraction", "must lie strictly between 0 and 1")
        _require(0.0 <= self.synthetic_fraction <= 1.0, f"{path}.synthetic_fraction", "must lie in [0, 1]")
        _require(0.0 <= self.passkey_share <= 1.0, f"{path}.passkey_share", "must lie in [0, 1]")
        _require(0.0 <= self.shuffled_share <= 1.0, f"{path}.shuffled_share", "must lie in [0, 1]")
        _require(0.0 <= self.noise_share <= 1.0, f"{path}.noise_share", "must lie in [0, 1]")
        _require(self.noise_alphabet >= 2, f"{path}.noise_alphabet", "must be at least 2")
        _require(self.noise_weight > 0, f"{path}.noise_weight", "must be positive")
        _require(self.recall_weight > 0, f"{path}.recall_weight", "must be positive")
        _require(self.context_weight >= 0, f"{path}.context_weight", "must be >= 0")
        _require(0 < self.passage_min <= self.passage_max, f"{path}.passage_min", "must be in 1..passage_max")
        _require(self.min_gap_windows >= 0, f"{path}.min_gap_windows", "must be >= 0")
        _require(self.task_span >= 0, f"{path}.task_span", "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1        # on matrices only (not norms, biases, gates)
    grad_clip: float = 1.0           # 0 = off
    lr_scale: dict[str, float] = field(default_factory=dict)  # per parameter group, e.g. {gates: 10}: lr x 10

    def validate(self, path: str = "optim") -> None:
        _require(self.lr > 0, f"{path}.lr", "must be positive")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"{path}.min_lr_ratio", "must lie in [0, 1]")
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{path}.betas", "two values in [0, 1)")
        _require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        _require(self.grad_clip >= 0, f"{path}.grad_clip", "must be >= 0")
        for group, scale in self.lr_scale.items():
            _require(group in PARAM_GROUPS, f"{path}.lr_scale", f"unknown parameter group {group!r} (known: {', '.join(PARAM_GROUPS)})")
            _require(isinstance(scale, (int, float)) and scale > 0, f"{path}.lr_scale.{group}", "must be a positive number")


@dataclass
class TrainConfig:
    model: str = "configs/tiny.yaml"   # model config (relative to the training config's folder or cwd)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys, e.g. {"variant": "mag"}
    init: str | None = None            # model folder to start from (fine-tuning); None = from scratch
    train: list[str] = field(default_factory=lambda: list(PARAM_GROUPS))  # parameter groups that learn
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000                  # optimiser steps (one per TBPTT window)
    batch_size: int = 8
    tbptt_segments: int = 8            # segments (of attention.segment_len tokens) per backward
    windows_per_sequence: int = 2      # TBPTT windows a stream's state is carried over before it resets
    # Plain-text streams this many windows long, mixed in at `long_text_share` of the sequences (0 = none):
    # the memory is read after thousands of tokens while every synthetic task still starts fresh.
    long_text_windows: int = 0
    long_text_share: float = 0.0
    eval_every: int = 100
    eval_batches: int = 2
    checkpoint_every: int = 100
    log_every: int = 10
    activation_checkpointing: bool = False
    bf16: bool = True                  # autocast on GPU only; CPU always runs the model's dtype
    seed: int = 0
    threads: int = 0                   # torch threads on CPU; 0 = leave torch's default

    def validate(self, path: str = "") -> None:
        for group in self.train:
            _require(group in PARAM_GROUPS, "train", f"unknown parameter group {group!r} (known: {', '.join(PARAM_GROUPS)})")
        _require(len(self.train) > 0, "train", "needs at least one parameter group")
        for key in ("steps", "batch_size", "tbptt_segments", "windows_per_sequence", "eval_every", "eval_batches",
                    "checkpoint_every", "log_every"):
            _require(getattr(self, key) > 0, key, "must be positive")
        _require(self.threads >= 0, "threads", "must be >= 0")
        _require(self.long_text_windows >= 0, "long_text_windows", "must be >= 0")
        _require(0.0 <= self.long_text_share <= 1.0, "long_text_share", "must lie in [0, 1]")
        _require(self.long_text_share == 0.0 or self.long_text_windows > 0, "long_text_share",
                 "needs long_text_windows > 0")

    @property
    def sequence_segments(self) -> int:
        return self.tbptt_segments * self.windows_per_sequence

    def to_dict(self) -> dict:
        return to_dict(self)


MERGED_SECTIONS = ("data", "optim")  # a `base:` file's sections that a config changes key by key


def _rebased(value: str, base_dir: Path, config_dir: Path) -> str:
    """A path written in the base file that exists relative to the base's folder, made relative to the
    including config's folder; any other path (absolute, or meant from the working directory or the repo
    root, which the trainer tries first and last) stays as written."""
    if Path(value).is_absolute() or base_dir == config_dir or not (base_dir / value).exists():
        return value
    return os.path.relpath(base_dir / value, config_dir)


def read_train_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A training config's mapping, with `base: other.yaml` (relative to this file) resolved: the base's keys,
    then this file's over them. `data` and `optim` merge key by key; any other key (model_overrides
    included) replaces the base's whole. Bases can chain."""
    path = Path(path)
    data = read_yaml(path)
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base_name!r}")
    base_path = path.parent / base_name
    if base_path.resolve() in _seen + (path.resolve(),):
        raise ConfigError(f"{path}: base: {base_name} includes itself")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: config file not found: {base_path}")
    merged = read_train_yaml(base_path, _seen + (path.resolve(),))
    base_dir, config_dir = base_path.parent.resolve(), path.parent.resolve()
    for key in ("model", "init"):
        if isinstance(merged.get(key), str):
            merged[key] = _rebased(merged[key], base_dir, config_dir)
    if isinstance(merged.get("data"), dict) and isinstance(merged["data"].get("files"), list):
        merged["data"]["files"] = [_rebased(f, base_dir, config_dir) if isinstance(f, str) else f
                                   for f in merged["data"]["files"]]
    for key, value in data.items():
        if key in MERGED_SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_train_config(path: str | Path) -> TrainConfig:
    data = read_train_yaml(path)
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_groups(text: str) -> list[str]:
    """`memory,persistent` -> ["memory", "persistent"], checked against the known groups."""
    groups = [g.strip() for g in text.split(",") if g.strip()]
    for group in groups:
        if group not in PARAM_GROUPS:
            raise ConfigError(f"--train: unknown parameter group {group!r} (known: {', '.join(PARAM_GROUPS)})")
    if not groups:
        raise ConfigError("--train: needs at least one parameter group")
    return groups
