"""TitanModel: the single-process reference. It is the three runtime components called through the same
interfaces the pipeline calls remotely: Core (attention + FFN), LongTermMemory, PersistentMemory."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from titans_runtime.config import TitansConfig
from titans_runtime.errors import InputError
from titans_runtime.model.core import Core
from titans_runtime.model.long_term import LocalMemoryPort, LongTermMemory
from titans_runtime.model.persistent import PersistentMemory
from titans_runtime.model.state import StreamState

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TitanOutput:
    logits: Tensor       # (B, T, vocab)
    surprise: Tensor     # (B, T, n_memory_layers): per-token gradient norm of the memory loss
    knowledge: Tensor    # (B, T): attention mass on the persistent tokens (mean over heads and layers)
    state: StreamState


def segment_pieces(position: int, steps: int, segment_len: int | None) -> list[tuple[int, int]]:
    """Split [position, position + steps) at multiples of segment_len; offsets relative to position."""
    if segment_len is None:
        return [(0, steps)]
    pieces, start = [], 0
    while start < steps:
        boundary = ((position + start) // segment_len + 1) * segment_len
        end = min(steps, boundary - position)
        pieces.append((start, end))
        start = end
    return pieces


class TitanModel(nn.Module):
    def __init__(self, config: TitansConfig):
        super().__init__()
        self.config = config
        self.core = Core(config)
        self.memory = LongTermMemory(config)
        self.persistent = PersistentMemory(config)
        self.to(DTYPES[config.dtype])

    @property
    def memory_layer_ids(self) -> list[int]:
        return self.memory.layer_ids

    @property
    def device(self) -> torch.device:
        return self.core.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.core.tok_embeddings.weight.dtype

    def initial_state(self, batch: int = 1) -> StreamState:
        return StreamState(
            position=0,
            core=self.core.initial_state(batch, self.device, self.dtype),
            memory=self.memory.initial_state(batch, self.device, self.dtype),
        )

    def persistent_kv(self, task_ids: Tensor) -> list[tuple[Tensor, Tensor]] | None:
        if self.persistent.n_tokens == 0:
            return None
        bank = self.persistent.bank(task_ids)
        return self.core.persistent_kv(bank, tuple(int(t) for t in task_ids))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        task_ids: Tensor | int | None = None,
        state: StreamState | None = None,
    ) -> TitanOutput:
        """input_ids: (B, T). attention_mask: (B, T), 0 = padding (only at the end of a stream's last
        segment: padding is neither attended nor written into memory). task_ids: (B,) or int."""
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        batch, steps = input_ids.shape
        vocab = self.config.model.vocab_size
        if steps and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise InputError(f"token id outside the vocabulary 0..{vocab - 1}")
        if state is None:
            state = self.initial_state(batch)
        if task_ids is None:
            task_ids = torch.zeros(batch, dtype=torch.long)
        elif isinstance(task_ids, int):
            task_ids = torch.full((batch,), task_ids, dtype=torch.long)
        self.persistent.check_task_ids(task_ids)
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        persistent = self.persistent_kv(task_ids)
        core_state, memory_state = dict(state.core), {k: dict(v) for k, v in state.memory.items()}
        segment = self.config.attention.segment_len if self.config.variant == "mac" else None
        logits, surprise, knowledge = [], [], []
        for start, end in segment_pieces(state.position, steps, segment):
            piece_valid = None if valid is None else valid[:, start:end]
            port = LocalMemoryPort(self.memory, memory_state, piece_valid)
            hidden, kn, core_state = self.core(
                input_ids[:, start:end], state.position + start, core_state, port, persistent, piece_valid
            )
            logits.append(self.persistent.head(hidden))
            knowledge.append(kn)
            if self.memory_layer_ids:
                surprise.append(torch.stack([port.surprise[i] for i in self.memory_layer_ids], dim=-1))
        new_state = StreamState(position=state.position + steps, core=core_state, memory=memory_state)
        empty = input_ids.new_zeros(batch, steps, len(self.memory_layer_ids), dtype=self.dtype)
        return TitanOutput(
            logits=torch.cat(logits, dim=1) if logits else input_ids.new_zeros(batch, 0, vocab, dtype=self.dtype),
            surprise=torch.cat(surprise, dim=1) if surprise else empty,
            knowledge=torch.cat(knowledge, dim=1) if knowledge else input_ids.new_zeros(batch, 0, dtype=self.dtype),
            state=new_state,
        )
