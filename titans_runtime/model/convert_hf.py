"""Hugging Face LLaMA checkpoints: config.json + model.safetensors (sharded with an index) or pytorch_model*.bin.

Hugging Face stores wq / wk permuted for its rotate-half rotary (transformers' convert_llama_weights_to_hf
`permute`: view(heads, D/2, 2, dim).transpose(1, 2)); our rotary is Meta's interleaved one, so they are
un-permuted exactly here (a view; the copy into the model does the only data movement)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import Tensor

from titans_runtime.config import BackboneConfig
from titans_runtime.errors import ConfigError, InputError
from titans_runtime.model.convert import (
    TORCH_DTYPE_NAMES,
    MappedFile,
    SourceCheckpoint,
    WeightSource,
    copy_into,
    find_tokenizer,
    read_json,
)

DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float64": "float64"}
LAYER_WEIGHTS = {  # HF name inside model.layers.N -> ours inside core.layers.N
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints saved; recomputed by us


def unpermute(heads: int) -> Callable[[Tensor], Tensor]:
    """Inverse of HF's permute: rows of each head go from [real halves | imaginary halves] back to pairs."""

    def apply(w: Tensor) -> Tensor:
        rows, cols = w.shape
        return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    return apply


def _rope(data: dict, cfg_path: Path) -> tuple[float, dict | None]:
    """rope_theta and llama3 scaling from either transformers 4.x (rope_theta, rope_scaling) or 5.x
    (rope_parameters) config.json."""
    params = data.get("rope_parameters") or {}
    theta = data.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = data.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise InputError(f"{cfg_path}: unsupported rope scaling {kind!r} (only llama3 scaling converts)")
    try:
        return float(theta), {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    except KeyError as exc:
        raise InputError(f"{cfg_path}: llama3 rope scaling lacks {exc.args[0]!r}") from None


def backbone_from_hf(data: dict, cfg_path: Path) -> BackboneConfig:
    model_type = data.get("model_type")
    archs = data.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or any(a not in ("LlamaForCausalLM", "LlamaModel") for a in archs):
        raise InputError(f"{cfg_path}: unsupported architecture {model_type!r} {archs} "
                         "(only LLaMA, model_type 'llama' / LlamaForCausalLM, converts)")
    for key, plain in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if data.get(key, plain) != plain:
            raise InputError(f"{cfg_path}: unsupported {key}={data[key]!r} (a LLaMA has {plain!r})")
    try:
        dim, heads = int(data["hidden_size"]), int(data["num_attention_heads"])
        head_dim = data.get("head_dim") or dim // heads
        if head_dim * heads != dim:
            raise InputError(f"{cfg_path}: head_dim {head_dim} x {heads} heads != hidden_size {dim} (not supported)")
        theta, scaling = _rope(data, cfg_path)
        backbone = BackboneConfig(
            dim=dim,
            n_layers=int(data["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(data.get("num_key_value_heads") or heads),
            vocab_size=int(data["vocab_size"]),
            ffn_hidden_dim=int(data["intermediate_size"]),
            norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
        )
        backbone.validate()
    except KeyError as exc:
        raise InputError(f"{cfg_path}: missing {exc.args[0]!r}") from None
    except (TypeError, ValueError, ConfigError) as exc:
        raise InputError(f"{cfg_path}: {exc}") from None
    return backbone


def weight_files(directory: Path) -> list[Path]:
    """The weight files, preferring safetensors; sharded ones through their index."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index}: no weight_map")
            files = [directory / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise InputError(f"{index}: lists {f.name}, which is missing")
            return files
        if (directory / single).is_file():
            return [directory / single]
    raise InputError(f"{directory}: no model.safetensors or pytorch_model.bin weights next to config.json")


def read_hf(directory: Path) -> SourceCheckpoint:
    cfg_path = directory / "config.json"
    data = read_json(cfg_path)
    backbone = backbone_from_hf(data, cfg_path)
    files = [MappedFile(f) for f in weight_files(directory)]
    located: dict[str, tuple[MappedFile, str]] = {}
    for f in files:
        for key in f.info:
            located[key] = (f, key)

    transforms = {"attention.wq.weight": unpermute(backbone.n_heads), "attention.wk.weight": unpermute(backbone.kv_heads)}
    weights: dict[str, WeightSource] = {}
    for key, (f, _) in located.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        ours, transform = _our_name(key, transforms)
        if ours is None:
            raise InputError(f"{f.path}: unexpected weight '{key}' (not a LLaMA weight)")
        weights[ours] = WeightSource(f.info[key][0], f"{f.path.name}: {key}", copy_into(f, key, transform))
    embed = located.get("model.embed_tokens.weight")
    tied = bool(data.get("tie_word_embeddings", False))
    if embed is not None and (tied or "persistent.output.weight" not in weights):
        if not tied:
            raise InputError(f"{directory}: no lm_head.weight and tie_word_embeddings is false")
        f, key = embed  # our LM head is its own weight: a tied checkpoint's head is a copy of the embedding
        weights["persistent.output.weight"] = WeightSource(f.info[key][0], f"{f.path.name}: {key}", copy_into(f, key))
    first = next(iter(files[0].info.values()), None)
    dtype = DTYPE_NAMES.get(str(data.get("dtype") or data.get("torch_dtype") or ""))
    if dtype is None:  # no (or an odd) dtype in config.json: the weights' own dtype
        dtype = TORCH_DTYPE_NAMES.get(first[1], "float32") if first else "float32"
    return SourceCheckpoint(
        path=directory,
        layout="hf",
        config_file=cfg_path,
        backbone=backbone,
        dtype=dtype,
        weights=weights,
        tokenizer=find_tokenizer(directory),
        max_seq_len=data.get("max_position_embeddings"),
        files=files,
    )


def _our_name(key: str, transforms: dict) -> tuple[str | None, Callable | None]:
    if key == "model.embed_tokens.weight":
        return "core.tok_embeddings.weight", None
    if key == "model.norm.weight":
        return "persistent.norm.weight", None
    if key == "lm_head.weight":
        return "persistent.output.weight", None
    parts = key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in LAYER_WEIGHTS:
        ours = LAYER_WEIGHTS[parts[3]]
        return f"core.layers.{parts[2]}.{ours}", transforms.get(ours)
    return None, None
