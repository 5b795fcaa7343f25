"""Configs are data: YAML -> dataclasses, with one clear error naming the bad key."""
from __future__ import annotations

from pathlib import Path

import pytest

from titans_runtime.config import TitansConfig, load_config
from titans_runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "llama-7b-mac", "llama-7b-mag", "llama-7b-mal"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.variant in ("mac", "mag", "mal")
    if name.startswith("llama-7b"):
        m = cfg.model
        assert (m.n_layers, m.dim, m.n_heads, m.vocab_size) == (32, 4096, 32, 32000)
        assert cfg.variant == name.rsplit("-", 1)[1]


@pytest.mark.parametrize("text, key", [
    ("model:\n  dimm: 64\n", "model.dimm"),
    ("variant: mad\n", "variant"),
    ("model:\n  dim: sixty\n", "model.dim"),
    ("model:\n  dim: 100\n  n_heads: 3\n", "n_heads"),
    ("model:\n  n_kv_heads: 3\n", "n_kv_heads"),
    ("memory:\n  heads: 3\n  dim: 128\n", "memory.heads"),
    ("memory:\n  chunk_size: 5\n", "memory.chunk_size"),
    ("memory:\n  depth: 0\n", "memory.depth"),
    ("memory:\n  layers: [7]\n", "memory.layers[0]"),
    ("memory:\n  enabled: yes please\n", "memory.enabled"),
    ("persistent:\n  n_tokens: -1\n", "persistent.n_tokens"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert key in message and "\n" not in message and str(path) in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "x.yaml")


def test_round_trip_and_overrides(tmp_path):
    cfg = TitansConfig().replace(**{"variant": "mag", "memory.depth": 3})
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    with pytest.raises(ConfigError, match="memory.dpth"):
        cfg.replace(**{"memory.dpth": 1})
