"""Our model format: a folder with `config.yaml` (TitansConfig) and `model.safetensors` (weights)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from titans_runtime.config import TitansConfig, load_config
from titans_runtime.errors import InputError
from titans_runtime.model.titans import TitanModel

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"


def save_model(model: TitanModel, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_FILE)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "titans-model-v1"})
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu", config: TitansConfig | None = None) -> TitanModel:
    """Load a model folder written by save_model (or `tools/convert_llama.py`); `default` = shipped model."""
    directory = DEFAULT_MODEL_DIR if str(directory) == "default" else Path(directory)
    if not directory.is_dir():
        raise InputError(f"model folder not found: {directory}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(f"{directory}: no {WEIGHTS_FILE} (expected a titans model folder)")
    cfg = config or load_config(directory / CONFIG_FILE)
    model = TitanModel(cfg)
    state = load_file(str(weights), device=str(device))
    expected = model.state_dict()
    for name, tensor in state.items():  # load_state_dict would raise a many-line error instead
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise InputError(f"{weights}: weight '{name}' has shape {tuple(tensor.shape)}, "
                             f"{directory / CONFIG_FILE if config is None else 'the config'} implies {tuple(expected[name].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        kind = "missing" if missing else "unexpected"
        raise InputError(f"{weights}: {kind} weight '{name}' for this config")
    return model.to(device)


def load_or_build(model: str | Path | None, config: str | Path | None = None, seed: int = 0) -> TitanModel:
    """A tool's model: random weights (seeded) from `config` when one is given, else the trained folder
    `model` (`default` or None: the shipped one)."""
    if config is not None:
        torch.manual_seed(seed)
        return TitanModel(load_config(config))
    return load_model(model or "default")
