"""Average the weights of model folders of one config (checkpoint averaging): a model between two points of
one training lineage, e.g. the shipped default, the mean of its last two stages.

    python tools/average_models.py --out runs/averaged runs/a/checkpoint/model runs/b/checkpoint/model
    python tools/average_models.py --out runs/averaged A B --weights 0.75,0.25

The folders must share their config (the same shapes are not enough: a different variant or memory
setting would average weights that mean different things). Weights are averaged in float64 and written
in the models' own dtype; integer buffers must agree.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from titans_runtime.errors import InputError, TitansError, report_error  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="model folders (config.yaml + model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the averaged model")
    p.add_argument("--weights", help="comma-separated weights, one per model (default: equal); normalised to sum 1")
    return p.parse_args(argv)


def parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise InputError(f"--weights: expected comma-separated numbers, got {text!r}") from None
    if len(weights) != count:
        raise InputError(f"--weights: {len(weights)} weights for {count} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"--weights: must be >= 0 with a positive sum, got {text!r}")
    return [w / sum(weights) for w in weights]


def average_state(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of state dicts with the same keys; non-float tensors must be equal."""
    averaged = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            if any(not torch.equal(first, s[name]) for s in states[1:]):
                raise InputError(f"buffer '{name}' differs between the models (only float weights average)")
            averaged[name] = first.clone()
            continue
        total = sum(w * s[name].double() for w, s in zip(weights, states))
        averaged[name] = total.to(first.dtype)
    return averaged


def average_models(folders: list[str], out: str, weights: list[float]) -> Path:
    from titans_runtime.model.checkpoint import load_model, save_model

    models = [load_model(folder) for folder in folders]
    for folder, model in zip(folders[1:], models[1:]):
        if model.config != models[0].config:
            raise InputError(f"{folder}: config differs from {folders[0]}'s (only models of one config average)")
    states = [m.state_dict() for m in models]
    models[0].load_state_dict(average_state(states, weights))
    return save_model(models[0], out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if len(args.models) < 2:
            raise InputError("give at least two model folders to average")
        weights = parse_weights(args.weights, len(args.models))
        out = average_models(args.models, args.out, weights)
    except TitansError as exc:
        return report_error(exc)
    shares = ", ".join(f"{w:.3g} x {m}" for w, m in zip(weights, args.models))
    print(f"averaged {shares} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
