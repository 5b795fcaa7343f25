"""tools/eval_memory.py: the merge of earlier --json results (the table, which models the plot draws), its
one-line input errors, and the warm-memory streams."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import titans_runtime.evaluation.png_plot as png_plot

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("eval_memory", REPO / "tools" / "eval_memory.py")
eval_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_memory)


def _row(accuracy: float) -> dict:
    return {"repeat": {"first": 2.0, "second": 1.0, "ratio": 0.5},
            "passkey": {"1": {"accuracy": accuracy, "digit_accuracy": accuracy},
                        "2": {"accuracy": accuracy, "digit_accuracy": accuracy}},
            "bits_per_byte": 2.25}


def _results(tmp_path: Path) -> Path:
    results = {"titans, long name": {"variant": "mag", "params": 1000, "memory": {"on": _row(1.0), "off": _row(0.0)}},
               "swa": {"variant": "mag", "params": 990, "memory": {"none": _row(0.0)}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"args": {}, "results": results}))
    return path


def test_merge_plots_the_chosen_models_under_their_legends(tmp_path, monkeypatch, capsys):
    drawn = []
    monkeypatch.setattr(png_plot, "accuracy_plot", lambda path, xs, series, *a, **k: drawn.append(series))
    path = _results(tmp_path)
    args = ["--from-json", str(path), "--lengths", "1,2", "--plot", str(tmp_path / "p.png")]
    assert eval_memory.main(args + ["--plot-model", "swa", "--plot-model", "titans, long name=titans"]) == 0
    assert [label for label, _, _ in drawn[0]] == ["swa", "titans memory on", "titans memory off"]
    assert [dashed for _, _, dashed in drawn[0]] == [False, False, True]
    assert "| titans, long name | mag | 1,000 | on | 2.000 -> 1.000 (0.500) | 100% (100%) |" in capsys.readouterr().out
    assert eval_memory.main(args) == 0                      # no --plot-model: every model
    assert len(drawn[1]) == 3


def test_merge_names_an_unknown_plot_model_in_one_line(tmp_path, capsys):
    path = _results(tmp_path)
    assert eval_memory.main(["--from-json", str(path), "--lengths", "1,2", "--plot", str(tmp_path / "p.png"),
                             "--plot-model", "nope"]) != 0
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "\n" not in err


def test_an_unknown_plot_model_fails_before_evaluating(monkeypatch, capsys):
    import titans_runtime.evaluation.memory as ev

    def evaluated(*args, **kwargs):
        raise AssertionError("evaluated before checking --plot-model")

    monkeypatch.setattr(ev, "stream_predictions", evaluated)  # what the bits-per-byte evaluation reads
    argv = ["--model", "default", "--evals", "bpb", "--plot", "x.png", "--plot-model", "nope"]
    assert eval_memory.main(argv) != 0
    assert "nope" in capsys.readouterr().err


def test_bits_by_position_averages_each_stretch_and_agrees_with_bits_per_byte():
    import math

    import torch

    from titans_runtime.config import config_from_dict
    from titans_runtime.evaluation import memory as ev
    from titans_runtime.model.titans import TitanModel
    from titans_runtime.model.tokenizer import ByteTokenizer

    nll = torch.tensor([[1.0, 1.0, 2.0, 4.0], [3.0, 1.0, 2.0, 0.0]]) * math.log(2)
    assert ev.bits_by_position(nll, [2]) == pytest.approx([1.5, 2.0])
    assert ev.bits_by_position(nll, [1, 3]) == pytest.approx([2.0, 1.5, 2.0])
    with pytest.raises(ValueError):
        ev.bits_by_position(nll, [3, 2])

    torch.manual_seed(0)
    model = TitanModel(config_from_dict({
        "variant": "mag", "tokenizer": "byte",
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 256, "multiple_of": 16},
        "attention": {"window": 16, "segment_len": 16}, "memory": {"layers": [0], "heads": 2, "chunk_size": 4}}))
    tokens = torch.randint(0, 256, (2, 65))
    nll, _ = ev.stream_predictions(model, tokens)
    parts = ev.bits_by_position(nll, [16, 40])
    whole = ev.bits_per_byte(model, tokens, ByteTokenizer())
    assert abs((16 * parts[0] + 24 * parts[1] + 24 * parts[2]) / 64 - whole) < 1e-5


def test_bad_position_cuts_are_one_line_errors(capsys):
    for cuts in ("256,x", "300,200", "0,10", "5000"):
        assert eval_memory.main(["--model", "default", "--evals", "bpb", "--bpb-positions", cuts]) != 0
        err = capsys.readouterr().err.strip()
        assert "--bpb-positions" in err and "\n" not in err


def test_a_warm_pass_key_stream_is_the_cold_one_after_other_text():
    """--warm: the same needle, haystack and question, after `warm` tokens of other held-out text; the
    answer positions move with them."""
    import numpy as np
    import torch

    from titans_runtime.evaluation import memory as ev
    from titans_runtime.model.tokenizer import ByteTokenizer
    from titans_runtime.training.data import Corpus

    tokenizer = ByteTokenizer()
    text = torch.randint(32, 127, (4000,), generator=torch.Generator().manual_seed(0))
    corpus = Corpus(["t"], [text[:1000]], [text[1000:]])
    cold, a0, a1 = ev.passkey_batch(corpus, tokenizer, np.random.default_rng(3), trials=4, haystack=100)
    warm, w0, w1 = ev.passkey_batch(corpus, tokenizer, np.random.default_rng(3), trials=4, haystack=100, warm=50)
    assert (w0, w1) == (a0 + 50, a1 + 50)
    assert torch.equal(warm[:, 50:], cold)
    assert not torch.equal(warm[0, :50], warm[1, :50])  # each stream its own text
    assert bytes(warm[:, w0:w1].flatten().tolist()).decode().isdigit()


def test_a_negative_warm_is_a_one_line_error(capsys):
    assert eval_memory.main(["--model", "default", "--evals", "repeat", "--warm", "-1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--warm" in err and "\n" not in err


def test_warm_reaches_both_recall_evaluations(monkeypatch, tmp_path):
    """--warm 3 puts 3 more windows of text before the passage (after its usual one-window lead) and 3
    windows before every needle; without it the layouts are as before."""
    from titans_runtime.evaluation import memory as ev

    seen = []
    real_repeat, real_passkey = ev.repeat_batch, ev.passkey_batch

    def repeat_batch(corpus, rng, trials, passage, gap, lead, **kw):
        seen.append(("lead", lead))
        return real_repeat(corpus, rng, trials, passage, gap, lead, **kw)

    def passkey_batch(*args, warm=0, **kw):
        seen.append(("warm", warm))
        return real_passkey(*args, warm=warm, **kw)

    monkeypatch.setattr(ev, "repeat_batch", repeat_batch)
    monkeypatch.setattr(ev, "passkey_batch", passkey_batch)
    small = ["--model", "default", "--memory", "on", "--evals", "repeat,passkey", "--lengths", "1",
             "--trials", "2", "--repeat-trials", "2", "--passage", "16"]
    window = 64  # the default model's attention window
    assert eval_memory.main(small + ["--warm", "3", "--json", str(tmp_path / "w.json")]) == 0
    assert seen == [("lead", 4 * window), ("warm", 3 * window)]
    assert json.loads((tmp_path / "w.json").read_text())["args"]["warm"] == 3
    seen.clear()
    assert eval_memory.main(small) == 0
    assert seen == [("lead", window), ("warm", 0)]
