"""The VRAM planner: planned bytes per stage against peaks traced from the real stage computations on
fake tensors (tiny and LLaMA-7B shape), the 3x3090 verdicts, the CLI's exit codes, the budget split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from titans_runtime.config import load_config
from titans_runtime.errors import ConfigError
from titans_runtime.planner import load_hardware, optimize_memory_distribution, plan_memory
from titans_runtime.planner.cli import main as plan_cli
from titans_runtime.planner.trace import STAGES, layer_groups, traced_peak
from titans_runtime.planner.tracer import FakeTrace

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MIB = 1 << 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_against_trace(cfg, train: bool, streams: int = 2) -> dict[str, tuple[int, int]]:
    """Planned tensor bytes vs traced peak per stage (one segment in flight, `streams` states resident)."""
    plan = plan_memory(cfg, load_hardware(None), streams, train=train, in_flight=1, search=False)
    out = {}
    for stage in STAGES:
        planned, traced = plan.stages[stage].tensor_bytes, traced_peak(cfg, stage, streams, train).peak
        out[stage] = (planned, traced)
        assert abs(planned - traced) <= 0.10 * traced, (
            f"{cfg.name} {stage} train={train}: planned {planned / MIB:.2f} MiB, traced {traced / MIB:.2f} MiB")
        # The weights (counted on the real modules) must not hide the rest: what comes on top of them
        # (states, caches, activations, gradients, optimizer, messages) is within 10% as well.
        weights = plan.stages[stage].items[f"weights ({cfg.dtype})"]
        assert abs((planned - weights) - (traced - weights)) <= 0.10 * (traced - weights), (
            f"{cfg.name} {stage} train={train}: beyond the weights planned {(planned - weights) / MIB:.2f} MiB, "
            f"traced {(traced - weights) / MIB:.2f} MiB")
    return out


# ------------------------------------------------------------------------------------------- tracer
def test_tracer_counts_live_bytes_exactly():
    with FakeTrace() as trace:
        a = torch.empty(1024, 1024)                   # 4 MiB
        b = a @ a                                     # + 4 MiB
        assert trace.live == 8 * MIB
        del b
        c = torch.empty(3)                            # 12 bytes: one 512-byte block
        assert trace.live == 4 * MIB + 512 and trace.peak == 8 * MIB
        positions = torch.arange(5, 2053)
        assert int(positions[0]) == 5 and int(positions[-1]) == 2052  # known values of small tensors
        del a, c


# ------------------------------------------------------------------------------ planned vs traced
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_tiny_plan_within_10_percent_of_trace(train):
    _check_against_trace(load_config(CONFIGS / "tiny.yaml"), train)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_llama_7b_plan_within_10_percent_of_trace(variant):
    cfg = load_config(CONFIGS / f"llama-7b-{variant}.yaml")
    assert cfg.model.dim == 4096 and cfg.model.n_layers == 32 and cfg.model.vocab_size == 32000
    result = _check_against_trace(cfg, train=False)
    assert result["core"][1] > 12 * (1 << 30)  # the full 7B backbone is in the trace (bf16 weights)


def test_llama_7b_training_plan_within_10_percent_of_trace():
    _check_against_trace(load_config(CONFIGS / "llama-7b-mac.yaml"), train=True, streams=1)


def test_layer_group_extrapolation_equals_the_full_trace():
    cfg = load_config(CONFIGS / "llama-7b-mac.yaml").replace(
        **{"model.n_layers": 12, "memory.layers": [3, 7, 11], "attention.segment_len": 128})
    assert layer_groups(cfg) == (3, 4, 3)
    for stage in ("core", "long_term_memory"):
        assert traced_peak(cfg, stage, 2) == traced_peak(cfg, stage, 2, scale=False)


# --------------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_llama_7b_defaults_fit_3x3090_and_doubling_streams_flips_the_verdict(variant):
    cfg = load_config(CONFIGS / f"llama-7b-{variant}.yaml")
    hardware = load_hardware(None)
    plan = plan_memory(cfg, hardware, streams=4)
    assert plan.fits, plan.describe()
    assert [round(s.budget_bytes / (1 << 30)) for s in plan.stages.values()] == [22, 21, 21]
    assert plan.largest_streams >= 4 and plan.largest_segment_len >= cfg.attention.segment_len
    streams = 4
    while plan.fits:
        streams *= 2
        plan = plan_memory(cfg, hardware, streams=streams, search=False)
    assert streams - 1 >= 4 and [s.name for s in plan.overflowing] == ["core"]
    assert "stage core" in plan.verdict() and "attention cache" in plan.verdict()
    # The largest-streams answer is exact: it fits, one more does not.
    largest = plan_memory(cfg, hardware, streams=4).largest_streams
    assert plan_memory(cfg, hardware, largest, search=False).fits
    assert not plan_memory(cfg, hardware, largest + 1, search=False).fits


def test_items_are_named_and_add_up():
    cfg = load_config(CONFIGS / "llama-7b-mac.yaml")
    plan = plan_memory(cfg, load_hardware(None), 2, search=False)
    core = plan.stages["core"]
    assert core.total_bytes == sum(core.items.values())
    for name in ("weights (bfloat16)", "attention cache (per stream)", "persistent K/V cache (per active task)",
                 "activations (inference)", "communication buffers", "CUDA context + workspaces",
                 "allocator reserve (fragmentation)"):
        assert name in core.items
    assert "memory state (per stream)" in plan.stages["long_term_memory"].items
    # Per-stream items double with the streams; the weights do not change.
    four = plan_memory(cfg, load_hardware(None), 4, search=False).stages["core"].items
    assert four["attention cache (per stream)"] == 2 * core.items["attention cache (per stream)"]
    assert four["weights (bfloat16)"] == core.items["weights (bfloat16)"]
    # bf16 weights are half of fp32 ones; checkpointing saves activations in training.
    fp32 = plan_memory(cfg, load_hardware(None), 2, dtype="fp32", search=False).stages["core"].items
    assert fp32["weights (float32)"] == pytest.approx(2 * core.items["weights (bfloat16)"], rel=1e-3)
    train = plan_memory(cfg, load_hardware(None), 1, 2048, train=True, search=False).stages["core"]
    ckpt = plan_memory(cfg, load_hardware(None), 1, 2048, train=True, checkpointing=True, search=False).stages["core"]
    assert ckpt.items["activations (training, checkpointed)"] < train.items["activations (training)"] / 4
    assert not train.fits  # full 7B training with AdamW does not fit a 3090


def test_shared_gpu_box():
    hardware = load_hardware(CONFIGS / "hardware" / "1x80gb.yaml")
    assert {hardware.budget(s).device for s in STAGES} == {0}
    assert hardware.device_total_bytes("core") == 79 * (1 << 30)
    assert 0 < hardware.memory_fraction("core") < 1
    plan = plan_memory(load_config(CONFIGS / "llama-7b-mag.yaml"), hardware, streams=8)
    assert plan.fits, plan.describe()


def test_optimize_memory_distribution_splits_each_gpu():
    split = optimize_memory_distribution(72, 3, 4, 512)
    assert split["fits"]
    assert [list(g["stages"]) for g in split["per_gpu"]] == [["core"], ["long_term_memory"], ["persistent_memory"]]
    assert all(s["budget_gib"] == 22.0 for g in split["per_gpu"] for s in g["stages"].values())
    one = optimize_memory_distribution(80, 1, 4, 512)["per_gpu"][0]["stages"]
    assert sum(s["budget_gib"] for s in one.values()) == pytest.approx(80 * 11 / 12, abs=0.05)
    assert one["core"]["budget_gib"] > one["long_term_memory"]["budget_gib"]


# -------------------------------------------------------------------------------------------- CLI
def test_cli_fits_and_json(capsys):
    assert plan_cli(["--config", str(CONFIGS / "llama-7b-mac.yaml")]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "core" in out and "largest streams" in out
    assert plan_cli(["--config", str(CONFIGS / "tiny.yaml"), "--json", "--streams", "3", "--segment-len", "128"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["streams"] == 3 and data["segment_len"] == 128
    assert set(data["stages"]) == set(STAGES)
    assert data["stages"]["core"]["budget_bytes"] == 22 * (1 << 30)


def test_cli_does_not_fit_names_stage_item_and_fix(capsys):
    code = plan_cli(["--config", str(CONFIGS / "llama-7b-mac.yaml"), "--streams", "32", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and not data["fits"]
    assert data["overflow"] == [{"stage": "core", "item": "attention cache (per stream)"}]
    assert f"--streams {data['largest_streams']}" in data["verdict"]


def _bad(capsys, args: list[str], expected: str) -> None:
    assert plan_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err


def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path):
    tiny = (CONFIGS / "tiny.yaml").read_text()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(tiny.replace("variant: mac", "variant: mac\nflavour: vanilla"))
    _bad(capsys, ["--config", str(unknown)], "flavour")
    negative = tmp_path / "negative.yaml"
    negative.write_text(tiny.replace("dim: 128", "dim: -128"))
    _bad(capsys, ["--config", str(negative)], "model.dim")
    _bad(capsys, ["--config", str(CONFIGS / "tiny.yaml"), "--streams", "-2"], "streams")
    _bad(capsys, ["--config", str(CONFIGS / "tiny.yaml"), "--segment-len", "0"], "segment length")
    _bad(capsys, ["--config", str(CONFIGS / "tiny.yaml"), "--segment-len", "100"], "chunk_size")
    _bad(capsys, ["--config", str(CONFIGS / "tiny.yaml"), "--dtype", "int8"], "dtype")
    _bad(capsys, ["--config", str(tmp_path / "missing.yaml")], "not found")
    hw = (CONFIGS / "hardware" / "3x3090.yaml").read_text()
    above = tmp_path / "above.yaml"
    above.write_text(hw.replace("core: {device: 0, budget_gib: 22}", "core: {device: 0, budget_gib: 30}"))
    _bad(capsys, ["--config", str(CONFIGS / "tiny.yaml"), "--hardware", str(above)], "above the 24 GiB")
    neg = tmp_path / "neg.yaml"
    neg.write_text(hw.replace("memory_gib: 24}\n  - {name", "memory_gib: -24}\n  - {name", 1))
    _bad(capsys, ["--config", str(CONFIGS / "tiny.yaml"), "--hardware", str(neg)], "memory_gib")
    typo = tmp_path / "typo.yaml"
    typo.write_text(hw.replace("fragmentation:", "fragmentaton:"))
    _bad(capsys, ["--config", str(CONFIGS / "tiny.yaml"), "--hardware", str(typo)], "fragmentaton")
    shared = tmp_path / "shared.yaml"
    shared.write_text(hw.replace("device: 1,", "device: 0,"))
    _bad(capsys, ["--config", str(CONFIGS / "tiny.yaml"), "--hardware", str(shared)], "add up to")


def test_load_hardware_errors_name_the_key(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("name: x\ndevices: [{memory_gib: 24}]\nstages: {core: {device: 3, budget_gib: 1}}\n")
    with pytest.raises(ConfigError, match="stages.core.device"):
        load_hardware(path)
