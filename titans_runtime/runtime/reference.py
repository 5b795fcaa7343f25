"""The single-process reference of a pipeline run: TitanModel fed segment by segment, carrying the state,
with the pipeline's loss convention. The pipeline must equal it (tests) and is timed against it
(benchmarks)."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from titans_runtime.model.long_term import LongTermMemory, LongTermState
from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import TitanModel


def memory_reset_at(memory: LongTermMemory, position: int, variant: str, device: Any, dtype: torch.dtype) -> LongTermState:
    """The initial long-term memory as if cleared at stream `position` (the `memory off` ablation): fresh
    weights and momentum, the token count at `position`, and for MAC the segment read snapshot."""
    state = memory.initial_state(1, device, dtype)
    for layer, mem in state.items():
        mem["seen"] = torch.tensor(position, dtype=torch.int64)
        if variant == "mac":
            for i in range(memory.memories[layer].depth):
                mem[f"segment_w{i}"] = mem[f"w{i}"]
    return state


@torch.no_grad()
def reference_run(model: TitanModel, streams: list, resume: dict[str, StreamState] | None = None,
                  memory_off: bool = False, task_id: int = 0) -> tuple[list, dict[str, StreamState]]:
    """(results as SegmentResult, final state per stream), streams one after the other."""
    from titans_runtime.runtime.pipeline import SegmentResult

    resume = resume or {}
    results, finals = [], {}
    for stream in streams:
        state = resume.get(stream.stream_id)
        if state is None:
            state = model.initial_state(1)
        segments = stream.segments()
        segment = next(segments, None)
        while segment is not None:
            following = next(segments, None)
            t0 = time.perf_counter()
            if memory_off:
                state = StreamState(state.position, state.core,
                                    memory_reset_at(model.memory, state.position, model.config.variant, model.device,
                                                    model.dtype))
            tokens = segment.tokens.to(torch.int64)
            out = model(tokens[None].to(model.device), task_ids=task_id, state=state)
            state = out.state
            targets = torch.full_like(tokens, -1)
            targets[:-1] = tokens[1:]
            if following is not None:
                targets[-1] = following.tokens[0]
            keep = targets >= 0
            n = int(keep.sum())
            logits = out.logits[0][keep.to(out.logits.device)]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = float(F.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")) / n if n else math.nan
            ms = (time.perf_counter() - t0) * 1e3
            results.append(SegmentResult(
                stream=stream.stream_id, seq_no=segment.seq_no, token_start=segment.token_start,
                token_end=segment.token_end, loss=loss, bits_per_token=loss / math.log(2),
                surprise=[float(v) for v in out.surprise[0].mean(0)] if out.surprise.shape[-1] else [],
                knowledge_attention=float(out.knowledge.mean()), stage_ms={"single_process": ms}, n_predicted=n,
            ))
            segment = following
        finals[stream.stream_id] = state
    return results, finals
