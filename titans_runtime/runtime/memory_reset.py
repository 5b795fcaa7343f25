"""`--memory off`: the ablation where the long-term memory forgets everything at every segment.

The memory part of a stream state is replaced by the model's fresh initial memory state (learned initial
weights, zero momentum, zero conv tails, no pending chunk), so nothing survives beyond the attention
window; the core's attention caches and the stream position are kept. One counter is kept on purpose:
`seen` (tokens the memory has been shown), because MAC reads the memory weights held at the start of each
attention segment and finds those starts through it; with `seen` restarted at 0 after a reset that is
not on an attention-segment boundary, the reads would switch weights in the middle of a segment. The
held segment weights (`segment_w*`), when present, become the fresh weights as well.
"""
from __future__ import annotations

from titans_runtime.model.long_term import LongTermMemory, LongTermState
from titans_runtime.model.state import StreamState

KEPT_KEYS = ("seen",)


def fresh_long_term_state(memory: LongTermMemory, old: LongTermState) -> LongTermState:
    """`old` (one entry per memory layer) with its memory forgotten; batch, device and dtype from `old`."""
    fresh: LongTermState = {}
    for layer, layer_state in old.items():
        module = memory.memories[layer]
        w0 = layer_state["w0"]
        model_dtype = module.to_q.weight.dtype
        new = module.initial_state(w0.shape[0], w0.device, model_dtype)
        for key in KEPT_KEYS:
            if key in layer_state:
                new[key] = layer_state[key]
        for i in range(module.depth):
            if f"segment_w{i}" in layer_state:
                new[f"segment_w{i}"] = new[f"w{i}"]
        fresh[layer] = new
    return fresh


def reset_long_term_memory(model, state: StreamState) -> StreamState:
    """The stream state with a fresh long-term memory; core caches and position unchanged."""
    return StreamState(position=state.position, core=dict(state.core),
                       memory=fresh_long_term_state(model.memory, state.memory))
