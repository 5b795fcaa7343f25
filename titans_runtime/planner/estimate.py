"""Bytes per stage, as named line items, from the model config, the segment length and the streams.

Every tensor term below follows the stage code (titans_runtime/model/): weights are counted on the real
modules built on the meta device; states, messages and activations are the tensors those modules create,
each rounded up to the CUDA caching allocator's 512-byte blocks. The tests check the totals against peaks
traced from the real stage computations on fake tensors (titans_runtime/planner/trace.py).

Two habits of the model code cost memory and are planned as they are (the trace sees them too):
- a state tensor kept as a slice of a larger tensor keeps the whole storage: the MAG/MAL window cache
  holds (window - 1 + segment) tokens, a conv tail its segment's conv input, the pending chunk its
  segment's keys and values;
- attention with extra tokens (persistent, MAC memory tokens) appends probe channels to the values,
  a head size no fused kernel takes, so it runs the math path with fp32 scores (heads x T x S).
  (On a GPU the math path upcasts half precision the same way; the planner assumes it there too.)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from titans_runtime.config import TitansConfig

BLOCK = 512
PROBE_CHANNELS = 3  # Attention.attend appends these to the values to measure persistent/memory/window mass
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
STAGES = ("core", "long_term_memory", "persistent_memory")


def r(nbytes: float) -> int:
    """One allocation: rounded up to the caching allocator's block."""
    n = int(nbytes)
    return -(-n // BLOCK) * BLOCK if n > 0 else 0


@dataclass(frozen=True)
class Shape:
    """The sizes every formula uses, for one config, segment length and dtype."""

    cfg: TitansConfig
    T: int          # tokens per segment (one message of the pipeline)
    ds: int         # bytes per element of the model dtype
    fs: int         # bytes per element of fast weights / momentum (fp32, fp64 for a float64 model)

    @property
    def m(self):
        return self.cfg.model

    @property
    def mac(self) -> bool:
        return self.cfg.variant == "mac"

    @property
    def memory_layers(self) -> list[int]:
        return self.cfg.memory_layers

    @property
    def n_persistent(self) -> int:
        return self.cfg.persistent.n_tokens if self.cfg.variant != "lmm" else 0

    def attends(self, layer: int) -> bool:
        return not (self.cfg.variant == "lmm" and layer in self.memory_layers)

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.m.n_layers) if self.attends(i)]

    @property
    def cache_tokens(self) -> int:
        """Tokens of keys (and of values) each attention layer's cache storage holds after a segment."""
        return self.T if self.mac else self.cfg.attention.window - 1 + self.T

    @property
    def keys_in_attention(self) -> int:
        """Window keys one segment attends over (cache + new)."""
        return self.T if self.mac else self.cfg.attention.window - 1 + self.T

    def extra_tokens(self, layer: int) -> int:
        return self.n_persistent + (self.T if self.mac and layer in self.memory_layers else 0)

    # memory geometry
    @property
    def md(self) -> int:
        return self.cfg.memory.dim or self.m.dim

    @property
    def mheads(self) -> int:
        return self.cfg.memory.heads

    @property
    def mhd(self) -> int:
        return self.md // self.mheads

    @property
    def mlp_sizes(self) -> list[tuple[int, int]]:
        hidden = max(1, int(round(self.mhd * self.cfg.memory.hidden_mult)))
        sizes = [self.mhd] + [hidden] * (self.cfg.memory.depth - 1) + [self.mhd]
        return list(zip(sizes[:-1], sizes[1:]))

    @property
    def mhidden(self) -> int:
        return max(d for pair in self.mlp_sizes for d in pair)


def make_shape(cfg: TitansConfig, segment_len: int) -> Shape:
    ds = DTYPE_BYTES[cfg.dtype]
    return Shape(cfg=cfg, T=segment_len, ds=ds, fs=max(ds, 4))


# --------------------------------------------------------------------------------------------- weights
@lru_cache(maxsize=64)
def _module_bytes(cfg_yaml: str, stage: str) -> tuple[int, int]:
    """(all parameter + buffer bytes, trainable parameter bytes) of a stage's module, built on meta."""
    import json

    from titans_runtime.config import config_from_dict
    from titans_runtime.model.core import Core
    from titans_runtime.model.long_term import LongTermMemory
    from titans_runtime.model.persistent import PersistentMemory
    from titans_runtime.model.titans import DTYPES

    cfg = config_from_dict(json.loads(cfg_yaml))
    cls = {"core": Core, "long_term_memory": LongTermMemory, "persistent_memory": PersistentMemory}[stage]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[cfg.dtype])
    try:
        with torch.device("meta"):
            module = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    params = sum(r(p.numel() * p.element_size()) for p in module.parameters())
    buffers = sum(r(b.numel() * b.element_size()) for b in module.buffers())
    return params + buffers, params


@lru_cache(maxsize=64)
def _layer_param_bytes(cfg_yaml: str, stage: str) -> tuple[int, ...]:
    """Parameter bytes per layer (core: per CoreLayer; memory: per NeuralMemory), built on meta."""
    import json

    from titans_runtime.config import config_from_dict
    from titans_runtime.model.core import Core
    from titans_runtime.model.long_term import LongTermMemory
    from titans_runtime.model.titans import DTYPES

    cfg = config_from_dict(json.loads(cfg_yaml))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[cfg.dtype])
    try:
        with torch.device("meta"):
            module = Core(cfg) if stage == "core" else LongTermMemory(cfg)
    finally:
        torch.set_default_dtype(previous)
    layers = module.layers if stage == "core" else list(module.memories.values())
    return tuple(sum(r(p.numel() * p.element_size()) for p in layer.parameters()) for layer in layers)


def layer_param_bytes(cfg: TitansConfig, stage: str) -> tuple[int, ...]:
    return _layer_param_bytes(_weights_key(cfg), stage)


def backward_peak(saved: list[int], grads: list[int], other_grads: int, inputs: list[int] | None = None) -> tuple[int, int]:
    """(activations, gradients) live at the backward peak: backward walks the layers from the last,
    freeing each layer's saved tensors while its weight gradients appear, so at layer l the saved
    tensors of layers <= l and the gradients of layers >= l are live (checkpointing: layer inputs
    below l and layer l recomputed). The gradients of the rest (embeddings) come last."""
    best = (0, sum(grads) + other_grads)
    for l in range(len(saved)):
        below = sum(inputs[:l]) if inputs is not None else sum(saved[:l])
        act, grad = below + saved[l], sum(grads[l:])
        if act + grad > sum(best):
            best = (act, grad)
    return best


def _weights_key(cfg: TitansConfig) -> str:
    """The config as text, less what does not change any parameter (cache key)."""
    import json

    data = cfg.to_dict()
    data.pop("attention", None)
    return json.dumps(data, sort_keys=True)


def module_bytes(cfg: TitansConfig, stage: str) -> tuple[int, int]:
    return _module_bytes(_weights_key(cfg), stage)


# ------------------------------------------------------------------------------------------------ core
def attention_cache_per_stream(s: Shape) -> int:
    """Keys and values each attention layer keeps for the stream (MAC: + the memory tokens' hk/hv)."""
    kv = s.m.kv_heads * s.m.head_dim * s.ds
    total = sum(2 * r(s.cache_tokens * kv) for _ in s.attention_layers)
    if s.mac:
        total += sum(2 * r(s.T * kv) for _ in s.memory_layers)
    return total


def persistent_kv_per_task(s: Shape) -> int:
    kv = s.m.kv_heads * s.m.head_dim * s.ds
    return sum(2 * r(s.n_persistent * kv) for _ in s.attention_layers) if s.n_persistent else 0


def _attention_inference(s: Shape, layer: int) -> int:
    """Live bytes while one attention layer runs (beyond the new cache), following Attention.attend."""
    m, T, ds = s.m, s.T, s.ds
    H, KV, hd, D = m.n_heads, m.kv_heads, m.head_dim, m.dim
    K, E = s.keys_in_attention, s.extra_tokens(layer)
    S = K + E
    rep = H // KV
    live = 3 * r(T * D * ds)                                   # residual, normed input, a projection
    live += r(H * T * hd * ds) + r(3 * T * (hd // 2) * 8)      # rotated queries, rotary angles
    live += 2 * r(T * K)                                        # bool masks (causal, window)
    if rep > 1:
        live += 2 * r(H * K * hd * ds)                          # repeat_kv copies
    if E == 0:  # fused kernel: output + logsumexp, float mask
        return live + r(T * K * ds) + r(H * T * hd * ds) + r(H * T * 4)
    sc = max(ds, 4)
    live += 2 * r(KV * E * hd * ds) + (2 * r(H * E * hd * ds) if rep > 1 else 0)  # extra keys/values
    live += r(H * E * PROBE_CHANNELS * ds) + r(H * K * PROBE_CHANNELS * ds)  # probe channels
    live += r(H * S * hd * ds) + r(H * S * (hd + PROBE_CHANNELS) * ds)       # joint keys / values
    live += r(T * S) + r(T * E) + r(T * S * ds)                 # joint bool mask, extra mask, float mask
    live += 2 * r(H * T * S * sc)                               # math-path scores and masked scores
    if ds < 4:  # the math path upcasts half-precision inputs to fp32
        live += 2 * r(H * T * hd * 4) + r(H * S * hd * 4) + r(H * S * (hd + PROBE_CHANNELS) * 4)
    else:
        live += r(H * T * hd * ds)                              # scaled queries
    return live


def _ffn_inference(s: Shape) -> int:
    T, D, F, ds = s.T, s.m.dim, s.m.hidden_dim, s.ds
    norm = 2 * r(T * D * 4) if ds < 4 else 0
    return 3 * r(T * D * ds) + 3 * r(T * F * ds) + norm


def core_activation_inference(s: Shape) -> int:
    attention = max((_attention_inference(s, i) for i in s.attention_layers), default=0)
    return max(attention, _ffn_inference(s)) + r(s.T * 8)  # + the token ids


def _attention_saved(s: Shape, layer: int) -> int:
    """Tensors autograd keeps for one layer's backward (training without checkpointing)."""
    m, T, ds = s.m, s.T, s.ds
    H, KV, hd, D, F = m.n_heads, m.kv_heads, m.head_dim, m.dim, m.hidden_dim
    K, E = s.keys_in_attention, s.extra_tokens(layer)
    S = K + E
    half = ds < 4
    saved = (7 if half else 5) * r(T * D * ds) + (4 * r(T * D * 4) if half else 0)  # norms, residuals
    saved += 4 * r(T * F * ds)                                  # SwiGLU inputs / outputs
    saved += 3 * r(H * T * hd * ds) + 2 * r(KV * T * hd * ds)  # q, k, v, rotary
    if E == 0:
        return saved + r(H * T * hd * ds) + r(H * T * 4)
    sc = max(ds, 4)
    saved += r(H * T * S * sc)                                  # softmax probabilities
    saved += r(H * S * hd * sc) + r(H * S * (hd + PROBE_CHANNELS) * sc) + r(H * T * hd * sc)  # scaled k^T, v, q
    saved += r(T * S * ds) + r(T * S)                           # masks
    saved += r(H * T * (hd + PROBE_CHANNELS) * ds) + 4 * r(H * T * hd * ds)  # joint output, gate re-weighting
    return saved


def core_training(s: Shape, checkpointing: bool) -> tuple[int, int]:
    """(activations, gradients) at the core's backward peak."""
    saved = [_attention_saved(s, i) for i in range(s.m.n_layers)]
    backward = max(r(s.m.n_heads * s.T * (s.keys_in_attention + s.extra_tokens(i)) * max(s.ds, 4))
                   for i in range(s.m.n_layers))  # softmax backward's gradient of the scores
    grads = list(layer_param_bytes(s.cfg, "core"))
    _, trainable = module_bytes(s.cfg, "core")
    inputs = [r(s.T * s.m.dim * s.ds)] * s.m.n_layers if checkpointing else None
    act, grad = backward_peak(saved, grads, trainable - sum(grads), inputs)
    return act + backward, grad


# ------------------------------------------------------------------------------------ long-term memory
def memory_state_per_stream(s: Shape, new: bool = False) -> int:
    """Fast weights + momentum (+ MAC segment snapshot), conv tails, pending chunk, per memory layer.
    new: what a segment in flight adds (one layer's new state; its snapshot / anchor are old weights)."""
    mem = s.cfg.memory
    weights = sum(r(s.mheads * a * b * s.fs) for a, b in s.mlp_sizes)
    n_weight_sets = 2 + (1 if s.mac and not new else 0) + (1 if mem.anchor_every > 1 and not new else 0)
    per_layer = n_weight_sets * weights
    if mem.conv_kernel > 1:
        n_conv = 4 if s.mac else 3
        per_layer += n_conv * r((s.T + mem.conv_kernel - 1) * s.md * s.ds)
    per_layer += 2 * r(s.T * s.md * s.fs) + r(s.mheads * s.T * 4 * s.fs) + BLOCK  # pending k/v/gates, seen
    # LongTermMemory replaces a layer's state as soon as that layer is done: only the layer in progress
    # holds its old and its new state at once.
    return per_layer if new else len(s.memory_layers) * per_layer


def memory_activation_inference(s: Shape) -> int:
    """One memory layer's update: q/k/v in fp32, the chunk loop's reads, the gated output."""
    if not s.memory_layers:
        return 0
    mem = s.cfg.memory
    T, D, md, fs, ds = s.T, s.m.dim, s.md, s.fs, s.ds
    b = mem.chunk_size
    n_chunks = -(-T // b)
    live = r(T * D * ds)                                        # the received input
    live += 3 * r(T * md * fs)                                  # q, k, v (fp32 copies)
    live += n_chunks * r(s.mheads * 2 * b * s.mhd * fs)         # chunk outputs the reads are views of
    chunk = sum(r(s.mheads * a * c * fs) for a, c in s.mlp_sizes)
    in_loop = chunk + 2 * r(s.mheads * 2 * b * s.mhidden * fs)  # one chunk's update in progress
    return live + max(in_loop, r(T * md * fs) + 3 * r(T * D * ds))  # or: the reads, out_proj, gate


def _memory_layer_saved(s: Shape) -> int:
    """What one memory layer's chunk loop keeps for backward (every chunk's weights and MLP tensors)."""
    mem = s.cfg.memory
    T, D, md, fs, ds = s.T, s.m.dim, s.md, s.fs, s.ds
    b = mem.chunk_size
    n_chunks = -(-T // b)
    weights = sum(r(s.mheads * a * c * fs) for a, c in s.mlp_sizes)
    # grad * silu'(z) keeps one hidden-sized tensor per chunk (z is pre-activation the forward kept anyway)
    per_chunk = 2 * weights + r(s.mheads * b * s.mhidden * fs) + 2 * r(s.mheads * 2 * b * s.mhidden * fs)
    per_chunk += r(s.mheads * 2 * b * s.mhd * fs) + 2 * r(s.mheads * b * s.mhd * fs)
    n_conv = (4 if s.mac else 3) if mem.conv_kernel > 1 else 0
    per_layer = n_chunks * per_chunk
    per_layer += n_conv * (r((T + mem.conv_kernel - 1) * md * ds) + 2 * r(T * md * ds))  # conv in/out, silu
    per_layer += 3 * r(T * md * fs) + 4 * r(T * D * ds)        # q, k, v; input, out_proj, gate, sigmoid
    return per_layer


def memory_training(s: Shape) -> tuple[int, int]:
    """(activations, gradients) at the memory stage's backward peak."""
    if not s.memory_layers:
        return 0, 0
    saved = [_memory_layer_saved(s)] * len(s.memory_layers)
    grads = list(layer_param_bytes(s.cfg, "long_term_memory"))
    act, grad = backward_peak(saved, grads, 0)
    return act, grad


# ------------------------------------------------------------------------------------ persistent memory
def head_activation(s: Shape, train: bool) -> int:
    """Final norm, logits, fp32 log-softmax for the per-token loss, the last token's sampling."""
    T, D, V, ds = s.T, s.m.dim, s.m.vocab_size, s.ds
    live = r(T * V * ds) + r(T * V * 4) + r(V * 4) * 2
    if ds < 4:
        live += r(T * V * 4)                                    # the fp32 copy of the logits
    if train:  # backward: log-softmax kept, the loss gradient and the log-softmax gradient (fp32)
        live = max(live, 3 * r(T * V * 4) + r(T * D * 4) + 2 * r(T * D * ds))
    return live


def head_training(s: Shape) -> tuple[int, int]:
    """(activations, gradients) at the persistent stage's backward peak: either while the logits'
    backward runs (no weight gradient yet) or when the head's weight gradient is formed."""
    T, D, V, ds = s.T, s.m.dim, s.m.vocab_size, s.ds
    _, trainable = module_bytes(s.cfg, "persistent_memory")
    logits_phase = head_activation(s, True)
    # the logits' gradient, the norm's saved input (fp32 copy for half precision) and output
    weight_phase = r(T * V * ds) + (r(T * D * 4) if ds < 4 else 0) + 2 * r(T * D * ds)
    if logits_phase >= weight_phase + trainable:
        return logits_phase, 0
    return weight_phase, trainable


# ---------------------------------------------------------------------------------------------- items
def stage_items(cfg: TitansConfig, stage: str, streams: int, segment_len: int, in_flight: int,
                train: bool, checkpointing: bool) -> dict[str, int]:
    """Named line items (bytes) of the tensors a stage holds; context and allocator reserve excluded."""
    s = make_shape(cfg, segment_len)
    weights, trainable = module_bytes(cfg, stage)
    items: dict[str, int] = {f"weights ({cfg.dtype})": weights}
    if train:
        items["optimizer state (AdamW, 2 moments)"] = 2 * trainable
    message = r(s.T * s.m.dim * s.ds)
    if stage == "core":
        if s.n_persistent and not train:
            items["persistent K/V cache (per active task)"] = min(streams, cfg.persistent.n_tasks) * persistent_kv_per_task(s)
        items["attention cache (per stream)"] = streams * attention_cache_per_stream(s)
        items["new attention cache (segments in flight)"] = in_flight * attention_cache_per_stream(s)
        if train:
            act, grad = core_training(s, checkpointing)
            items["gradients (live at the backward peak)"] = grad
            name = "activations (training, checkpointed)" if checkpointing else "activations (training)"
            items[name] = in_flight * act
            items["communication buffers"] = in_flight * (2 * len(s.memory_layers) + 1) * message
        else:
            items["activations (inference)"] = in_flight * core_activation_inference(s)
            items["communication buffers"] = in_flight * message
    elif stage == "long_term_memory":
        items["memory state (per stream)"] = streams * memory_state_per_stream(s)
        items["new memory state (layer in progress)"] = in_flight * memory_state_per_stream(s, new=True)
        if train:
            act, grad = memory_training(s)
            items["gradients (live at the backward peak)"] = grad
            items["activations (training)"] = in_flight * act
            n_msgs = (2 if s.mac else 1) * len(s.memory_layers)
            items["communication buffers"] = in_flight * 2 * n_msgs * message
        else:
            items["activations (inference)"] = in_flight * memory_activation_inference(s)
    else:
        if train:
            act, grad = head_training(s)
            items["gradients (live at the backward peak)"] = grad
            items["activations (logits, loss, sampling)"] = in_flight * act
        else:
            items["activations (logits, loss, sampling)"] = in_flight * head_activation(s, False)
        items["communication buffers"] = in_flight * message * (2 if train else 1)
    return items
