"""Model configuration as data: dataclasses loaded from YAML, validated with errors that name the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from titans_runtime.dataconf import from_dict, read_yaml, to_dict
from titans_runtime.errors import ConfigError

Variant = Literal["mac", "mag", "mal", "lmm"]
DType = Literal["float32", "float64", "bfloat16", "float16"]


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@dataclass
class BackboneConfig:
    """The LLaMA backbone (names follow Meta's params.json)."""

    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 256
    ffn_hidden_dim: int | None = None  # explicit hidden size; else derived LLaMA-style below
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self, path: str = "") -> None:
        for key in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of"):
            _require(getattr(self, key) > 0, _join(path, key), "must be positive")
        _require(self.dim % self.n_heads == 0, _join(path, "n_heads"),
                 f"{self.n_heads} heads do not divide dim {self.dim}")
        _require(self.head_dim % 2 == 0, _join(path, "n_heads"), "head dim must be even for rotary embeddings")
        _require(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0, _join(path, "n_kv_heads"),
                 f"{self.kv_heads} kv heads do not divide {self.n_heads} heads")
        _require(self.norm_eps > 0, _join(path, "norm_eps"), "must be positive")
        _require(self.rope_theta > 0, _join(path, "rope_theta"), "must be positive")
        if self.ffn_hidden_dim is not None:
            _require(self.ffn_hidden_dim > 0, _join(path, "ffn_hidden_dim"), "must be positive")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            _require(kind == "llama3", _join(path, "rope_scaling"), f"unsupported rope scaling {kind!r} (llama3 only)")
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                _require(key in self.rope_scaling, _join(path, f"rope_scaling.{key}"), "missing")


@dataclass
class AttentionConfig:
    """Short-term memory: MAC attends within fixed segments, MAG/MAL within a sliding window."""

    window: int = 64        # sliding-window length (MAG, MAL and memory-less layers of those)
    segment_len: int = 64   # MAC attention segment (aligned on absolute stream positions)

    def validate(self, path: str = "") -> None:
        _require(self.window > 0, _join(path, "window"), "must be positive")
        _require(self.segment_len > 0, _join(path, "segment_len"), "must be positive")


@dataclass
class MemoryConfig:
    """Neural long-term memory (LMM): a deep MLP whose weights are learned at test time."""

    enabled: bool = True
    layers: list[int] | None = None  # memory layers; None = every layer
    dim: int | None = None           # memory width (q/k/v projection size); None = model dim
    heads: int = 4
    depth: int = 2                   # MLP depth; 1 = linear memory
    hidden_mult: float = 2.0         # hidden width of the memory MLP, times the head dim
    chunk_size: int = 16             # mini-batch of tokens per gradient step
    anchor_every: int = 1            # chunks per gradient anchor; 1 = exact mini-batch descent (default),
                                     # k > 1 takes k chunks' gradients at one set of weights (faster)
    conv_kernel: int = 4             # causal depthwise conv on q/k/v; 0 = off
    momentum: bool = True            # eta-gated momentum of past surprise
    decay: bool = True               # alpha-gated forgetting
    theta_max: float = 1.0           # step size = theta_max * sigmoid(.)
    max_update_norm: float | None = None  # cap on one chunk's update norm per head (None = uncapped)
    induction_init: bool = False     # init: keys see the tokens just before the query's (see NeuralMemory)
    empty_init: bool = False         # init: the memory MLP's last layer is zero, a fresh memory reads 0
    block_tokens: int | None = 1024  # a longer call runs in blocks of this many tokens (exact), each
                                     # recomputed in backward: memory bounded by one block; None = off
    theta_init: float = 0.1
    eta_init: float = 0.9
    alpha_init: float = 0.001
    output_gate_init: float = 1.0    # 0 = closed: the memory starts with no effect on the backbone
    extra_attention_init: float = 1.0  # weight of persistent / memory tokens in attention; 0 = closed

    def head_dim(self, model_dim: int) -> int:
        return (self.dim or model_dim) // self.heads

    def validate(self, path: str = "") -> None:
        _require(self.heads > 0, _join(path, "heads"), "must be positive")
        if self.dim is not None:
            _require(self.dim > 0, _join(path, "dim"), "must be positive")
            _require(self.dim % self.heads == 0, _join(path, "heads"),
                     f"{self.heads} heads do not divide memory dim {self.dim}")
        _require(self.depth >= 1, _join(path, "depth"), "must be at least 1")
        _require(self.hidden_mult > 0, _join(path, "hidden_mult"), "must be positive")
        _require(self.chunk_size > 0, _join(path, "chunk_size"), "must be positive")
        _require(self.anchor_every >= 1, _join(path, "anchor_every"), "must be at least 1")
        _require(self.conv_kernel >= 0, _join(path, "conv_kernel"), "must be >= 0")
        _require(self.theta_max > 0, _join(path, "theta_max"), "must be positive")
        if self.max_update_norm is not None:
            _require(self.max_update_norm > 0, _join(path, "max_update_norm"), "must be positive (or null)")
        if self.block_tokens is not None:
            _require(self.block_tokens > 0, _join(path, "block_tokens"), "must be positive (or null)")
        if self.induction_init:
            _require(self.conv_kernel >= 2, _join(path, "induction_init"), "needs conv_kernel >= 2")
        for key in ("theta_init", "eta_init", "alpha_init"):
            val = getattr(self, key)
            _require(0.0 < val < 1.0, _join(path, key), "must lie strictly between 0 and 1")
        _require(self.theta_init < self.theta_max, _join(path, "theta_init"), "must be below theta_max")
        _require(self.output_gate_init >= 0, _join(path, "output_gate_init"), "must be >= 0")
        _require(self.extra_attention_init >= 0, _join(path, "extra_attention_init"), "must be >= 0")


@dataclass
class PersistentConfig:
    """Persistent memory: learnable, input-independent tokens, one bank per task id."""

    n_tokens: int = 4
    n_tasks: int = 1

    def validate(self, path: str = "") -> None:
        _require(self.n_tokens >= 0, _join(path, "n_tokens"), "must be >= 0")
        _require(self.n_tasks >= 1, _join(path, "n_tasks"), "must be >= 1")


@dataclass
class TitansConfig:
    """A whole Titans model: backbone, variant, short-term attention, long-term and persistent memory."""

    model: BackboneConfig = field(default_factory=BackboneConfig)
    variant: Variant = "mac"
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    persistent: PersistentConfig = field(default_factory=PersistentConfig)
    dtype: DType = "float32"
    tokenizer: str = "byte"  # "byte" or a path to a sentencepiece tokenizer.model
    name: str = "titans"

    @property
    def memory_layers(self) -> list[int]:
        """Indices of the layers that carry a long-term memory module."""
        if not self.memory.enabled and self.variant != "lmm":
            return []
        if self.memory.layers is None:
            return list(range(self.model.n_layers))
        return sorted(self.memory.layers)

    def validate(self, path: str = "") -> None:
        layers = self.memory.layers
        if layers is not None:
            for i, layer in enumerate(layers):
                _require(0 <= layer < self.model.n_layers, f"memory.layers[{i}]",
                         f"layer {layer} outside 0..{self.model.n_layers - 1}")
            _require(len(set(layers)) == len(layers), "memory.layers", "repeats a layer")
        if self.variant == "lmm":
            _require(self.memory.enabled, "memory.enabled", "the lmm variant needs the memory")
            _require(len(self.memory_layers) == self.model.n_layers, "memory.layers",
                     "the lmm variant (no attention) needs a memory in every layer")
        if self.variant == "mac" and self.memory_layers:
            _require(self.attention.segment_len % self.memory.chunk_size == 0, "memory.chunk_size",
                     f"must divide attention.segment_len ({self.attention.segment_len}) for MAC")

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self, **overrides: Any) -> "TitansConfig":
        """A copy with dotted overrides, e.g. replace(**{"memory.depth": 1, "variant": "mag"})."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            keys = dotted.split(".")
            node = data
            for key in keys[:-1]:
                if key not in node or not isinstance(node[key], dict):
                    raise ConfigError(f"unknown config key '{dotted}'")
                node = node[key]
            if keys[-1] not in node:
                raise ConfigError(f"unknown config key '{dotted}'")
            node[keys[-1]] = value
        return config_from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def config_from_dict(data: dict) -> TitansConfig:
    return from_dict(TitansConfig, data)


def load_config(path: str | Path) -> TitansConfig:
    """Load and validate a model config YAML; errors are one line naming the file and the key."""
    data = read_yaml(path)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
