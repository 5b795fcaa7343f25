"""Meta LLaMA checkpoints: params.json + consolidated.NN.pth, one file per model-parallel rank.

Our parameter names are Meta's (under core. / persistent.), so only the model-parallel shards need merging:
column-parallel weights (wq, wk, wv, w1, w3, output) are split along dim 0, row-parallel ones (wo, w2) along
dim 1, the token embedding along dim 1 (LLaMA 1/2 ParallelEmbedding) or dim 0 (Llama 3 VocabParallelEmbedding:
told apart by the shard's shape), and the norms are replicated. Each shard's piece is copied straight into its
slice of the model's parameter."""
from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from titans_runtime.config import BackboneConfig
from titans_runtime.errors import ConfigError, InputError
from titans_runtime.model.convert import (
    TORCH_DTYPE_NAMES,
    MappedFile,
    SourceCheckpoint,
    WeightSource,
    copy_rows,
    find_tokenizer,
    read_json,
)

COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
REPLICATED = ("attention_norm.weight", "ffn_norm.weight")
IGNORED = ("rope.freqs",)  # precomputed rotary frequencies in LLaMA 1 checkpoints; recomputed by us
KNOWN_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_seq_len",
                "max_batch_size"}
# Llama 3.1's apply_scaling: fixed values in Meta's code (3.2 1B/3B override the factor with 32).
META_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}


def backbone_from_params(params: dict, params_path: Path, vocab_size: int) -> BackboneConfig:
    unknown = sorted(set(params) - KNOWN_PARAMS)
    if unknown:
        raise InputError(f"{params_path}: unsupported parameter '{unknown[0]}' (not a plain LLaMA)")
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = dict(META_ROPE_SCALING)
        if params.get("rope_scaling_factor") is not None:
            scaling["factor"] = float(params["rope_scaling_factor"])
    try:
        backbone = BackboneConfig(
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=int(params["n_kv_heads"]) if params.get("n_kv_heads") else None,
            vocab_size=vocab_size,
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_dim_multiplier=float(params["ffn_dim_multiplier"]) if params.get("ffn_dim_multiplier") else None,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
        )
        backbone.validate()
    except KeyError as exc:
        raise InputError(f"{params_path}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError, ConfigError) as exc:
        raise InputError(f"{params_path}: {exc}") from None
    return backbone


def shard_files(directory: Path) -> list[Path]:
    shards = sorted(directory.glob("consolidated.*.pth"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not shards:
        raise InputError(f"{directory}: params.json but no consolidated.*.pth weights")
    return shards


def split_dim(key: str, shard_shape: tuple[int, ...], dim: int, n_shards: int) -> int | None:
    """The dimension a weight is split along across model-parallel shards (None: replicated)."""
    if n_shards == 1 or key.endswith(REPLICATED) or key == "norm.weight":
        return None
    if key == "tok_embeddings.weight":
        return 0 if shard_shape[1] == dim else 1
    if key == "output.weight" or key.endswith(COLUMN_PARALLEL):
        return 0
    if key.endswith(ROW_PARALLEL):
        return 1
    return None


def our_name(key: str) -> str | None:
    if key == "norm.weight":
        return "persistent.norm.weight"
    if key == "output.weight":
        return "persistent.output.weight"
    if key == "tok_embeddings.weight":
        return "core.tok_embeddings.weight"
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in COLUMN_PARALLEL + ROW_PARALLEL + REPLICATED:
        return f"core.{key}"
    return None


def merged_source(key: str, files: list[MappedFile], axis: int | None) -> WeightSource:
    """One parameter assembled from its pieces in every shard, each copied into its own slice."""
    shapes = [f.info[key][0] for f in files]
    origin = f"{files[0].path.name}: {key}"
    if axis is None:
        if any(s != shapes[0] for s in shapes):
            raise InputError(f"{origin}: replicated weight differs in shape across shards {shapes}")

        def fill_replicated(dest: Tensor) -> None:
            copy_rows(files[0], key, dest)

        return WeightSource(shapes[0], origin, fill_replicated)
    for f, s in zip(files, shapes):
        if len(s) != 2 or [d for i, d in enumerate(s) if i != axis] != [d for i, d in enumerate(shapes[0]) if i != axis]:
            raise InputError(f"{f.path.name}: {key}: shard shape {s} does not fit shard 0's {shapes[0]}")
    total = list(shapes[0])
    total[axis] = sum(s[axis] for s in shapes)

    def fill_merged(dest: Tensor) -> None:
        offset = 0
        for f, s in zip(files, shapes):
            copy_rows(f, key, dest.narrow(axis, offset, s[axis]))
            offset += s[axis]

    return WeightSource(tuple(total), origin, fill_merged)


def read_meta(directory: Path) -> SourceCheckpoint:
    params_path = directory / "params.json"
    params = read_json(params_path)
    files = [MappedFile(p) for p in shard_files(directory)]
    keys = set(files[0].info)
    for f in files[1:]:
        if set(f.info) != keys:
            odd = sorted(set(f.info) ^ keys)[0]
            raise InputError(f"{f.path}: weight '{odd}' is in some shards and not in others")
    if "tok_embeddings.weight" not in keys:
        raise InputError(f"{files[0].path}: no tok_embeddings.weight (not a Meta LLaMA checkpoint)")
    try:
        dim = int(params["dim"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{params_path}: missing or bad 'dim'") from None

    weights: dict[str, WeightSource] = {}
    for key in sorted(keys):
        if key in IGNORED:
            continue
        ours = our_name(key)
        if ours is None:
            raise InputError(f"{files[0].path}: unexpected weight '{key}' (not a LLaMA weight)")
        weights[ours] = merged_source(key, files, split_dim(key, files[0].info[key][0], dim, len(files)))

    embed_rows = weights["core.tok_embeddings.weight"].shape[0]
    vocab = int(params.get("vocab_size", -1) or -1)
    tokenizer = find_tokenizer(directory, directory.parent)
    if vocab <= 0:  # old params.json: the embedding says how many rows the vocabulary has
        vocab = embed_rows
    backbone = backbone_from_params(params, params_path, vocab)
    return SourceCheckpoint(
        path=directory,
        layout="meta",
        config_file=params_path,
        backbone=backbone,
        dtype=TORCH_DTYPE_NAMES.get(files[0].info["tok_embeddings.weight"][1], "float32"),
        weights=weights,
        tokenizer=tokenizer,
        max_seq_len=params.get("max_seq_len"),
        files=files,
    )
