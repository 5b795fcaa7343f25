"""Training checkpoints (all safetensors + one JSON): model folder, optimiser moments, the carried
stream state of the current TBPTT sequence, the torch RNG and the step. Written to a temporary folder
and renamed, so a crash never leaves a half-written checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from titans_runtime.errors import InputError
from titans_runtime.model.checkpoint import save_model
from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import TitanModel

MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "stream_state.safetensors"
RNG_FILE = "rng.safetensors"
TRAINER_FILE = "trainer.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten optimizer.state_dict() into named tensors + the param groups as JSON."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = value.detach().contiguous().clone()
    return tensors, json.dumps(sd["param_groups"])


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def save_checkpoint(directory: Path, model: TitanModel, optimizer: torch.optim.Optimizer,
                    carried: StreamState | None, trainer: dict) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, tmp / MODEL_DIR)
    tensors, groups = optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"param_groups": groups})
    if carried is not None:
        carried.save(tmp / STATE_FILE)
    save_file({"torch": torch.get_rng_state()}, str(tmp / RNG_FILE))
    (tmp / TRAINER_FILE).write_text(json.dumps({**trainer, "has_state": carried is not None}, indent=1))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(directory: Path, model: TitanModel, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> tuple[dict, StreamState | None]:
    """Restore model weights, optimiser and RNG in place; returns (trainer info, carried state)."""
    directory = Path(directory)
    info_file = directory / TRAINER_FILE
    if not info_file.is_file():
        raise InputError(f"no training checkpoint in {directory}")
    info = json.loads(info_file.read_text())
    weights = load_file(str(directory / MODEL_DIR / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise InputError(f"{directory}: checkpoint does not match this model config "
                         f"({'missing' if missing else 'unexpected'} weight '{(missing or unexpected)[0]}')")
    from safetensors import safe_open

    opt_file = str(directory / OPTIMIZER_FILE)
    with safe_open(opt_file, framework="pt") as f:
        groups = (f.metadata() or {})["param_groups"]
    load_optimizer_tensors(optimizer, load_file(opt_file, device=str(device)), groups)
    torch.set_rng_state(load_file(str(directory / RNG_FILE))["torch"])
    carried = StreamState.load(directory / STATE_FILE, device) if info.get("has_state") else None
    return info, carried
