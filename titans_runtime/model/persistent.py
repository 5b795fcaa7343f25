"""Persistent memory: learnable, input-independent tokens (one bank per task id), and the LM head.

This is the third runtime component: it owns the task banks, the final norm and the output projection.
The core turns a bank into per-layer keys/values once per task (they depend on the task only)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from titans_runtime.config import TitansConfig
from titans_runtime.errors import InputError
from titans_runtime.model.llama import RMSNorm


class PersistentMemory(nn.Module):
    def __init__(self, cfg: TitansConfig):
        super().__init__()
        m = cfg.model
        self.n_tasks = cfg.persistent.n_tasks
        self.n_tokens = cfg.persistent.n_tokens if cfg.variant != "lmm" else 0
        # One bank of tokens per task and layer, in the model's hidden space (normed by each layer).
        self.banks = nn.Parameter(torch.randn(self.n_tasks, m.n_layers, self.n_tokens, m.dim) * 0.02)
        self.norm = RMSNorm(m.dim, m.norm_eps)
        self.output = nn.Linear(m.dim, m.vocab_size, bias=False)

    def check_task_ids(self, task_ids: Tensor) -> None:
        bad = task_ids[(task_ids < 0) | (task_ids >= self.n_tasks)]
        if bad.numel():
            raise InputError(f"unknown task id {int(bad[0])} (this model has task ids 0..{self.n_tasks - 1})")

    def bank(self, task_ids: Tensor) -> Tensor:
        """(B,) task ids -> (B, n_layers, n_tokens, dim)."""
        self.check_task_ids(task_ids)
        return self.banks[task_ids.to(self.banks.device)]

    def head(self, hidden: Tensor) -> Tensor:
        """Final norm + LM head: (B, T, dim) -> logits (B, T, vocab)."""
        return self.output(self.norm(hidden))
