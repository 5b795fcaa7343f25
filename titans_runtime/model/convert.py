"""LLaMA -> Titans: load a Meta or Hugging Face LLaMA checkpoint into a TitanModel whose memory starts closed.

The backbone weights come from the checkpoint; the long-term memory, the persistent tokens and the per-head
`extra_gate` of the attention are fresh, with `memory.output_gate_init = 0` (NeuralMemory.output_scale = 0)
and `memory.extra_attention_init = 0` (extra_gate = 0: persistent / memory tokens carry no softmax mass). So
the converted model's logits equal the original LLaMA's for inputs that fit in the attention window
(`attention.window` / `segment_len` = `max_seq_len`); past it, the short-term attention is a sliding window
(MAG, MAL) or a segment (MAC) by design. Both gates are learnable from 0.

Memory: the model is built on the meta device and each parameter is allocated once and filled straight from
the checkpoint file, tensor by tensor, through memory maps that are re-opened every few hundred MB so the
process never holds a second copy of the weights (see `MappedFile`).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from titans_runtime.config import BackboneConfig, TitansConfig, config_from_dict, load_config
from titans_runtime.dataconf import read_yaml, to_dict
from titans_runtime.errors import ConfigError, InputError
from titans_runtime.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_model
from titans_runtime.model.llama import Rotary
from titans_runtime.model.long_term import LongTermMemory
from titans_runtime.model.persistent import PersistentMemory
from titans_runtime.model.titans import DTYPES, TitanModel
from titans_runtime.model.tokenizer import is_tiktoken, load_tokenizer

DEFAULT_MAX_SEQ_LEN = 2048
READ_BLOCK_BYTES = 64 << 20  # largest piece of a weight copied out of a file at once
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                     torch.float64: "float64"}


# ----------------------------------------------------------------------------------------------- reading
class MappedFile:
    """A weight file (safetensors, or a torch zip `.pth` / `.bin`) read one tensor at a time.

    Pages of a memory-mapped file that the process has touched count in its resident memory until the map
    is closed, so the map is closed and re-opened after every `budget` bytes read: resident file pages stay
    bounded however large the file is."""

    def __init__(self, path: Path, budget: int = 256 << 20):
        self.path = Path(path)
        self.budget = budget
        self.is_safetensors = self.path.suffix == ".safetensors"
        self._handle: Any = None
        self._read = 0
        self._mmap = True
        self.info: dict[str, tuple[tuple[int, ...], torch.dtype]] = self._scan()

    def _open(self) -> Any:
        if self._handle is None:
            if self.is_safetensors:
                from safetensors import safe_open

                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            else:
                self._handle = self._torch_load()
            self._read = 0
        return self._handle

    def _torch_load(self) -> dict:
        try:
            if self._mmap:
                return torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # only a legacy (non-zip) torch file cannot be memory-mapped
                raise InputError(f"{self.path}: cannot read torch weights ({str(exc).splitlines()[0]})") from None
            self._mmap = False  # read it whole, once, and keep it: costs its size in memory
        except Exception as exc:
            raise InputError(f"{self.path}: cannot read torch weights ({str(exc).splitlines()[0]})") from None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{self.path}: cannot read torch weights ({str(exc).splitlines()[0]})") from None

    def _scan(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        try:
            handle = self._open()
            if self.is_safetensors:
                info = {}
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    info[key] = (tuple(piece.get_shape()), _safetensors_dtype(piece.get_dtype()))
            else:
                if not isinstance(handle, dict):
                    raise InputError(f"{self.path}: expected a dict of tensors, got {type(handle).__name__}")
                info = {k: (tuple(v.shape), v.dtype) for k, v in handle.items() if isinstance(v, Tensor)}
        except InputError:
            raise
        except Exception as exc:  # a truncated or foreign file
            raise InputError(f"{self.path}: cannot read weights ({str(exc).splitlines()[0]})") from None
        self.close()
        return info

    def get(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        """The tensor `key` (or its rows [start, end)): a copy for safetensors, a view of the map for torch."""
        handle = self._open()
        if self.is_safetensors:
            tensor = handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows[0]:rows[1]]
        else:
            tensor = handle[key] if rows is None else handle[key][rows[0]:rows[1]]
        self._read += tensor.numel() * tensor.element_size()
        if self._read >= self.budget and self._mmap:
            self.close()  # the returned tensor keeps its own pages alive until the caller drops it
        return tensor

    def close(self) -> None:
        if self._handle is not None and self._mmap:
            if self.is_safetensors:
                self._handle.__exit__(None, None, None)
            self._handle = None


def _safetensors_dtype(name: str) -> torch.dtype:
    names = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
             "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    return names.get(name, torch.uint8)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------------- checkpoint model
@dataclass
class WeightSource:
    """Where one of our parameters comes from: its shape in the checkpoint and how to copy it in."""

    shape: tuple[int, ...]
    origin: str                         # "file: key", for error messages
    fill: Callable[[Tensor], None]      # copies the checkpoint tensor into the destination (casting dtype)


@dataclass
class SourceCheckpoint:
    """A LLaMA checkpoint as read from its folder, before any weight is loaded."""

    path: Path
    layout: str                          # "meta", "hf" or "titans" (our own folder)
    config_file: Path                    # params.json / config.json (named in errors)
    backbone: BackboneConfig
    dtype: str                           # the checkpoint's weight dtype, one of config.DType
    weights: dict[str, WeightSource]     # our parameter name -> source
    tokenizer: Path | None = None        # tokenizer.model / tokenizer.json found next to the weights
    max_seq_len: int | None = None       # trained context length when the checkpoint states it
    files: list[MappedFile] = field(default_factory=list)

    def close(self) -> None:
        for f in self.files:
            f.close()


def copy_into(file: MappedFile, key: str, transform: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor], None]:
    """A fill function: dest <- transform(file[key]); the copy casts the dtype without a temporary. Without a
    transform, a large weight (an embedding) is read in blocks of rows, so no whole-tensor copy is held."""

    def fill(dest: Tensor) -> None:
        if transform is None:
            copy_rows(file, key, dest)
        else:
            dest.copy_(transform(file.get(key)))

    return fill


def copy_rows(file: MappedFile, key: str, dest: Tensor) -> None:
    """dest <- file[key], READ_BLOCK_BYTES of rows at a time (dest may be a slice of a parameter)."""
    shape, dtype = file.info[key]
    if len(shape) < 2:
        dest.copy_(file.get(key))
        return
    step = max(1, READ_BLOCK_BYTES // max(1, math.prod(shape[1:]) * dtype.itemsize))
    for start in range(0, shape[0], step):
        end = min(start + step, shape[0])
        dest[start:end].copy_(file.get(key, (start, end)))


def find_tokenizer(*folders: Path) -> Path | None:
    """The first folder's tokenizer: a sentencepiece tokenizer.model, else tokenizer.json (a tiktoken
    tokenizer.model, Meta's Llama 3 format, only when nothing else is there: loading it says what to do)."""
    for folder in folders:
        folder = folder.resolve()  # config.tokenizer must work from any working directory
        model, json_file = folder / "tokenizer.model", folder / "tokenizer.json"
        if model.is_file() and not is_tiktoken(model):
            return model
        if json_file.is_file():
            return json_file
        if model.is_file():
            return model
    return None


def is_titans_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_titans_folder(path: Path) -> SourceCheckpoint:
    """Our own model folder as a checkpoint source: every weight comes from model.safetensors (read lazily,
    unlike checkpoint.load_model, so loading it also holds a single copy)."""
    weights_file = MappedFile(path / WEIGHTS_FILE)
    weights = {key: WeightSource(shape, f"{WEIGHTS_FILE}: {key}", copy_into(weights_file, key))
               for key, (shape, _) in weights_file.info.items()}
    return SourceCheckpoint(path=path, layout="titans", config_file=path / CONFIG_FILE, backbone=BackboneConfig(),
                            dtype="float32", weights=weights, files=[weights_file])


def read_checkpoint(path: str | Path) -> SourceCheckpoint:
    """Detect the layout of a LLaMA checkpoint folder and read its config and weight index (no weights yet)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise InputError(f"{path}: expected a checkpoint folder (params.json or config.json with weights)")
    if (path / "params.json").is_file():
        from titans_runtime.model.convert_meta import read_meta

        return read_meta(path)
    if (path / "config.json").is_file():
        from titans_runtime.model.convert_hf import read_hf

        return read_hf(path)
    raise InputError(f"{path}: no params.json (Meta layout) or config.json (Hugging Face layout) found")


# ---------------------------------------------------------------------------------------------- config
def default_memory_section(backbone: BackboneConfig) -> dict:
    """Memory for a converted LLaMA unless a config says otherwise: every 4th layer counting back from the
    last, at most 1024 wide, heads of 128 (or fewer heads for small models)."""
    layers = sorted(range(backbone.n_layers - 1, -1, -4))
    width = min(backbone.dim, 1024)
    heads = next(h for h in (max(1, width // 128), 4, 2, 1) if width % h == 0)
    return {"layers": layers, "dim": None if width == backbone.dim else width, "heads": heads}


def converted_config(
    source: SourceCheckpoint,
    variant: str | None = None,
    max_seq_len: int | None = None,
    base: str | Path | TitansConfig | None = None,
    overrides: dict[str, Any] | None = None,
) -> TitansConfig:
    """The Titans config of a converted checkpoint: the backbone from the checkpoint; variant, attention,
    memory, persistent and dtype from `base` (a YAML path or config; its `model` section is ignored) or
    defaults; attention window / segment = max_seq_len (else the base's attention, else the default length);
    memory gates closed; then dotted `overrides`."""
    overrides = dict(overrides or {})
    data: dict[str, Any] = {"memory": default_memory_section(source.backbone), "dtype": source.dtype}
    if base is not None:
        given = base.to_dict() if isinstance(base, TitansConfig) else read_yaml(base)
        given.pop("model", None)
        for key, value in given.items():
            data[key] = value
    data["model"] = to_dict(source.backbone)
    data["variant"] = variant or data.get("variant", "mac")
    data["name"] = f"{source.path.name}-titans-{data['variant']}"
    data["tokenizer"] = str(source.tokenizer) if source.tokenizer is not None else "byte"
    if source.tokenizer is not None:
        check_tokenizer(source.tokenizer, source.backbone.vocab_size)
    memory = dict(data.get("memory") or {})
    memory["output_gate_init"] = 0.0
    memory["extra_attention_init"] = 0.0
    data["memory"] = memory
    if max_seq_len is not None or "attention" not in data:
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, source.max_seq_len or DEFAULT_MAX_SEQ_LEN)
        chunk = int(overrides.get("memory.chunk_size", memory.get("chunk_size", 16)))
        data["attention"] = attention_for(max_seq_len, chunk)
    for dotted, value in overrides.items():  # on the raw data: validation sees the final config only
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            if not isinstance(node.get(key) or {}, dict):
                raise ConfigError(f"unknown config key '{dotted}'")
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[last] = value
    return config_from_dict(data)


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """A tokenizer with more ids than the model's vocabulary belongs to another model: refuse it now."""
    try:
        tokenizer = load_tokenizer(str(path))
    except InputError:
        return  # unreadable here (e.g. tiktoken, or no `tokenizers` package): reported when it is used
    if tokenizer.vocab_size > vocab_size:
        raise InputError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocabulary of {vocab_size}")


def attention_for(max_seq_len: int, chunk_size: int) -> dict:
    """Window = max_seq_len; the MAC segment is rounded up to a multiple of the memory chunk (MAC needs it)."""
    if int(max_seq_len) <= 0:
        raise ConfigError(f"max_seq_len: must be positive, got {max_seq_len}")
    return {"window": int(max_seq_len), "segment_len": -(-int(max_seq_len) // chunk_size) * chunk_size}


# ------------------------------------------------------------------------------------------------ build
def build_model(config: TitansConfig, source: SourceCheckpoint, device: str | torch.device = "cpu") -> TitanModel:
    """Allocate the TitanModel once (on `device`) and fill the backbone from the checkpoint, tensor by tensor;
    the memory modules, persistent tokens and attention extra gates are fresh (from a LLaMA checkpoint) or
    overwritten by the checkpoint's (from our own folder)."""
    with torch.device("meta"):
        model = TitanModel(config)
    params = model.state_dict()  # every saved tensor: parameters and persistent buffers
    fresh = {name for name in params if name.startswith("memory.")}
    fresh |= {name for name in params if name.endswith(".extra_gate")} | {"persistent.banks"}
    for name, src in source.weights.items():
        if name not in params:
            raise InputError(f"{src.origin}: unexpected weight (no such parameter in the model "
                             f"{source.config_file.name} describes)")
        if tuple(params[name].shape) != tuple(src.shape):
            raise InputError(f"{src.origin}: shape {tuple(src.shape)} does not match {source.config_file.name} "
                             f"(expects {tuple(params[name].shape)})")
    missing = sorted(set(params) - fresh - set(source.weights))
    if source.layout == "titans":  # our own folder holds every weight, the memory's included
        missing = sorted(set(params) - set(source.weights))
    if missing:
        raise InputError(f"{source.path}: checkpoint has no weight for '{missing[0]}'")

    dtype = DTYPES[config.dtype]
    m = config.model
    model.core.to_empty(device=device)
    model.persistent.to_empty(device=device)
    # Fresh parts, built exactly as TitanModel builds them (including its cast to the model dtype).
    model.core.rotary = Rotary(m.head_dim, m.rope_theta, m.rope_scaling).to(device=device, dtype=dtype)
    model.memory = LongTermMemory(config).to(device=device, dtype=dtype)
    small = config.replace(**{"model.vocab_size": 1})  # only the banks are used: skip a vocab-sized head
    banks = PersistentMemory(small).banks.detach().to(dtype)
    with torch.no_grad():
        model.persistent.banks.copy_(banks)
        for layer in model.core.layers:
            layer.attention.extra_gate.fill_(config.memory.extra_attention_init)
        live = model.state_dict(keep_vars=True)  # to_empty replaced the meta tensors
        try:
            for name, src in source.weights.items():
                src.fill(live[name])
        finally:
            source.close()
    unset = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if unset:
        raise RuntimeError(f"converter bug: '{unset[0]}' was never initialised")
    return model


# -------------------------------------------------------------------------------------------- public API
def create_titan_model(
    checkpoint_path: str | Path,
    device: str | torch.device = "cpu",
    max_batch_size: int = 1,
    max_seq_len: int | None = None,
    variant: str | None = None,
    config: str | Path | TitansConfig | None = None,
    **overrides: Any,
) -> TitanModel:
    """A TitanModel from a LLaMA checkpoint folder (Meta: params.json + consolidated.NN.pth; Hugging Face:
    config.json + safetensors / pytorch_model.bin) or from one of our model folders (config.yaml +
    model.safetensors, e.g. written by tools/convert_llama.py).

    max_seq_len: attention window (MAG/MAL) and segment (MAC); the converted logits equal the LLaMA's for
    inputs up to this length (default min(2048, the checkpoint's max_position_embeddings)).
    max_batch_size: accepted for Meta's `Llama.build` signature and checked; nothing is pre-sized by it,
    stream state is allocated per call. variant: mac (default) | mag | mal | lmm. config: a Titans YAML (or
    config) giving variant / attention / memory / persistent / dtype. overrides: dotted config keys, e.g.
    create_titan_model(path, **{"memory.depth": 1, "dtype": "float32"}).
    """
    if int(max_batch_size) <= 0:
        raise InputError(f"max_batch_size must be positive, got {max_batch_size}")
    path = Path(checkpoint_path)
    if path.is_dir() and is_titans_folder(path):
        if config is not None:
            raise InputError(f"{path}: a Titans model folder has its own config.yaml; change it with dotted overrides")
        cfg = load_config(path / CONFIG_FILE)
        if variant is not None:
            overrides.setdefault("variant", variant)
        if max_seq_len is not None:
            chunk = int(overrides.get("memory.chunk_size", cfg.memory.chunk_size))
            for key, value in attention_for(max_seq_len, chunk).items():
                overrides.setdefault(f"attention.{key}", value)
        cfg = cfg.replace(**overrides) if overrides else cfg
        return build_model(cfg, read_titans_folder(path), device)
    source = read_checkpoint(path)
    try:
        cfg = converted_config(source, variant, max_seq_len, config, overrides)
    except BaseException:
        source.close()
        raise
    return build_model(cfg, source, device)


def convert_to_folder(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    variant: str | None = None,
    config: str | Path | TitansConfig | None = None,
    max_seq_len: int | None = None,
    **overrides: Any,
) -> Path:
    """Convert a LLaMA checkpoint into our model folder (config.yaml + model.safetensors), copying its
    tokenizer next to them so the folder is self-contained (config.tokenizer is then a relative name)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    model = create_titan_model(checkpoint_path, max_seq_len=max_seq_len, variant=variant, config=config, **overrides)
    tokenizer = model.config.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer != "byte":
        src = Path(tokenizer)
        if not src.is_absolute():  # a Titans folder names its tokenizer relative to itself
            src = Path(checkpoint_path) / src
        if (out / src.name).resolve() != src.resolve():
            shutil.copyfile(src, out / src.name)
        model.config = model.config.replace(tokenizer=src.name)
    save_model(model, out)
    return out
