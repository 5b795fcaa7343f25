"""tools/average_models.py: the weighted mean of model folders of one config, and its one-line errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from titans_runtime.config import load_config
from titans_runtime.model.checkpoint import load_model, save_model
from titans_runtime.model.titans import TitanModel

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("average_models", REPO / "tools" / "average_models.py")
average_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(average_models)


def _folders(tmp_path: Path) -> list[str]:
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folders.append(str(save_model(TitanModel(load_config(REPO / "configs" / "tiny.yaml")), tmp_path / f"m{seed}")))
    return folders


def test_the_average_is_the_weighted_mean_of_every_weight(tmp_path):
    a, b = _folders(tmp_path)
    assert average_models.main(["--out", str(tmp_path / "avg"), a, b, "--weights", "3,1"]) == 0
    wa, wb = load_model(a).state_dict(), load_model(b).state_dict()
    averaged = load_model(tmp_path / "avg")
    assert averaged.config == load_model(a).config
    for name, tensor in averaged.state_dict().items():
        expected = (0.75 * wa[name].double() + 0.25 * wb[name].double()).to(tensor.dtype)
        assert torch.equal(tensor, expected), name
    assert not torch.equal(wa["core.tok_embeddings.weight"], wb["core.tok_embeddings.weight"])  # a real average
    # equal weights by default, and a model averaged with itself is itself
    assert average_models.main(["--out", str(tmp_path / "same"), a, a]) == 0
    assert all(torch.equal(t, wa[n]) for n, t in load_model(tmp_path / "same").state_dict().items())


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    a, b = _folders(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    cfg.variant = "mal"
    other = str(save_model(TitanModel(cfg), tmp_path / "mal"))
    for argv, message in [([a], "at least two"), ([a, b, "--weights", "1"], "1 weights for 2 models"),
                          ([a, b, "--weights", "1,x"], "comma-separated numbers"),
                          ([a, str(tmp_path / "nowhere")], "model folder not found"),
                          ([a, other], "config differs")]:
        assert average_models.main(["--out", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()
