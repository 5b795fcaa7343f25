"""The core (short-term memory): embeddings, attention and feed-forward of every layer.

At memory layers it talks to the long-term memory only through a `MemoryPort`, so the same code runs
with the memory in this process (TitanModel) or in another actor (the runtime)."""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from titans_runtime.config import TitansConfig
from titans_runtime.model.llama import Attention, FeedForward, RMSNorm, Rotary

CoreState = dict[str, Tensor]
WINDOW_BLOCKS = 4  # sliding-window attention over a call longer than this many windows runs in query blocks


class MemoryPort(Protocol):
    """How the core reaches the long-term memory of one stream (or a batch of streams)."""

    def retrieve(self, layer: int, x: Tensor) -> Tensor:
        """MAC read h = M*(q(x)) with the weights of the segment start; no update."""

    def update_and_retrieve(self, layer: int, x: Tensor) -> Callable[[], Tensor]:
        """Write x into the memory, return a callable giving the gated retrieval (lets MAG overlap)."""


class CoreLayer(nn.Module):
    def __init__(self, cfg: TitansConfig):
        super().__init__()
        m = cfg.model
        self.attention_norm = RMSNorm(m.dim, m.norm_eps)
        self.attention = Attention(m, extra_gate_init=cfg.memory.extra_attention_init)
        self.ffn_norm = RMSNorm(m.dim, m.norm_eps)
        self.feed_forward = FeedForward(m.dim, m.hidden_dim)


class Core(nn.Module):
    def __init__(self, cfg: TitansConfig):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.variant = cfg.variant
        self.memory_layers = set(cfg.memory_layers)
        self.window = cfg.attention.window
        self.segment_len = cfg.attention.segment_len
        self.tok_embeddings = nn.Embedding(m.vocab_size, m.dim)
        self.layers = nn.ModuleList(CoreLayer(cfg) for _ in range(m.n_layers))
        self.rotary = Rotary(m.head_dim, m.rope_theta, m.rope_scaling)
        self._persistent_cache: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}

    # ----------------------------------------------------------------------------------------- state
    def initial_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> CoreState:
        m = self.cfg.model
        device = self.tok_embeddings.weight.device if device is None else device  # default: where the model is
        state: CoreState = {}
        for i in range(m.n_layers):
            empty = torch.zeros(batch, m.kv_heads, 0, m.head_dim, device=device, dtype=dtype)
            state[f"k{i}"], state[f"v{i}"] = empty, empty
            if self.variant == "mac" and i in self.memory_layers:
                state[f"hk{i}"], state[f"hv{i}"] = empty, empty
        return state

    def uses_attention(self, layer: int) -> bool:
        return not (self.variant == "lmm" and layer in self.memory_layers)

    # ------------------------------------------------------------------------------ persistent tokens
    def persistent_kv(self, bank: Tensor, task_key: tuple[int, ...] | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per-layer keys/values of the persistent tokens (no rotary: they have no position).
        Computed once per task and cached when no gradient is needed."""
        cacheable = task_key is not None and not torch.is_grad_enabled()
        if cacheable and task_key in self._persistent_cache:
            return self._persistent_cache[task_key]
        kv = []
        for i, layer in enumerate(self.layers):
            kv.append(layer.attention.keys_values(layer.attention_norm(bank[:, i].to(self.tok_embeddings.weight.dtype))))
        if cacheable:
            self._persistent_cache[task_key] = kv
        return kv

    def clear_persistent_cache(self) -> None:
        self._persistent_cache.clear()

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        # .to(device / dtype) moves the parameters; cached persistent K/V would stay behind.
        self._persistent_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------------------------- attention
    def _window_keys(self, layer: int, a: Tensor, positions: Tensor, state: CoreState, new: CoreState,
                     valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Queries, the layer's key/value context (cache + new) and its mask; updates the cache."""
        attn = self.layers[layer].attention
        q = self.rotary(attn.queries(a), positions)
        k_new, v_new = attn.keys_values(a)
        k_new = self.rotary(k_new, positions)
        keys = torch.cat((state[f"k{layer}"], k_new), dim=2)
        values = torch.cat((state[f"v{layer}"], v_new), dim=2)
        n_cache = keys.shape[2] - a.shape[1]
        key_pos = torch.arange(int(positions[0]) - n_cache, int(positions[-1]) + 1, device=a.device)
        causal = key_pos[None, :] <= positions[:, None]
        if self.variant == "mac":
            mask = causal  # the cache holds this segment only
            keep = keys.shape[2]
        else:
            mask = causal & (key_pos[None, :] > positions[:, None] - self.window)
            keep = self.window - 1
        mask = mask[None, None]
        if valid is not None:
            pad = torch.ones(valid.shape[0], n_cache, dtype=torch.bool, device=a.device)
            mask = mask & torch.cat((pad, valid), dim=1)[:, None, None, :]
        new[f"k{layer}"] = keys[:, :, max(0, keys.shape[2] - keep):]
        new[f"v{layer}"] = values[:, :, max(0, values.shape[2] - keep):]
        return q, keys, values, mask

    def _attend(self, layer: int, a: Tensor, positions: Tensor, state: CoreState, new: CoreState,
                persistent: tuple[Tensor, Tensor] | None, memory_tokens: Tensor | None,
                valid: Tensor | None) -> tuple[Tensor, Tensor]:
        attn = self.layers[layer].attention
        q, keys, values, mask = self._window_keys(layer, a, positions, state, new, valid)
        extra_k, extra_v, extra_m = [], [], []
        n_persistent = 0
        if persistent is not None and persistent[0].shape[2] > 0:
            pk, pv = persistent
            n_persistent = pk.shape[2]
            extra_k.append(pk.expand(a.shape[0], -1, -1, -1))
            extra_v.append(pv.expand(a.shape[0], -1, -1, -1))
            extra_m.append(torch.ones(1, 1, a.shape[1], n_persistent, dtype=torch.bool, device=a.device))
        if memory_tokens is not None:
            hk, hv = attn.keys_values(memory_tokens)
            hk = self.rotary(hk, positions)  # h_t sits at the position of the token it was read for
            hk = torch.cat((state[f"hk{layer}"], hk), dim=2)
            hv = torch.cat((state[f"hv{layer}"], hv), dim=2)
            new[f"hk{layer}"], new[f"hv{layer}"] = hk, hv
            n_cache = hk.shape[2] - a.shape[1]
            h_pos = torch.arange(int(positions[0]) - n_cache, int(positions[-1]) + 1, device=a.device)
            extra_k.append(hk)
            extra_v.append(hv)
            extra_m.append((h_pos[None, :] <= positions[:, None])[None, None])
        extra = None
        if extra_k:
            extra_mask = torch.cat([m.expand(-1, -1, a.shape[1], -1) for m in extra_m], dim=-1)
            extra = (torch.cat(extra_k, 2), torch.cat(extra_v, 2), extra_mask)
        steps, block = a.shape[1], WINDOW_BLOCKS * self.window
        if self.variant == "mac" or steps <= block:
            return attn.attend(q, keys, values, mask, *(extra or ()), n_persistent=n_persistent)
        # Sliding window over a long call: queries in blocks, each against the keys its window reaches
        # (cost T * (block + window), not T^2; the same result, the masked keys contribute nothing).
        n_cache = keys.shape[2] - steps
        outs, masses = [], []
        for start in range(0, steps, block):
            end = min(steps, start + block)
            first = max(0, n_cache + start - self.window + 1)
            rows, reach = slice(start, end), slice(first, n_cache + end)
            block_extra = () if extra is None else (extra[0], extra[1], extra[2][:, :, rows])
            out, mass = attn.attend(q[:, :, rows], keys[:, :, reach], values[:, :, reach], mask[:, :, rows, reach],
                                    *block_extra, n_persistent=n_persistent)
            outs.append(out)
            masses.append(mass)
        return torch.cat(outs, dim=1), torch.cat(masses, dim=1)

    # --------------------------------------------------------------------------------------- forward
    def forward(
        self,
        tokens: Tensor,
        position: int,
        state: CoreState,
        memory: MemoryPort | None,
        persistent: list[tuple[Tensor, Tensor]] | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, CoreState]:
        """Run all layers over tokens (B, T) starting at absolute stream `position`.

        For MAC, [position, position + T) must lie inside one attention segment (TitanModel splits).
        Returns (hidden (B, T, dim), knowledge attention (B, T), new core state)."""
        new = dict(state)
        steps = tokens.shape[1]
        positions = torch.arange(position, position + steps, device=tokens.device)
        if self.variant == "mac" and position % self.segment_len == 0:
            for key, val in state.items():  # a new segment: the attention cache starts empty
                new[key] = val[:, :, :0]
            state = dict(new)
        x = self.tok_embeddings(tokens)
        knowledge = x.new_zeros(tokens.shape)
        n_attention = 0
        for i, layer in enumerate(self.layers):
            a = layer.attention_norm(x)
            p_kv = persistent[i] if persistent is not None else None
            is_memory = i in self.memory_layers and memory is not None
            if is_memory and self.variant == "lmm":
                x = x + memory.update_and_retrieve(i, a)()
            elif is_memory and self.variant == "mac":
                h = memory.retrieve(i, a)
                y, kn = self._attend(i, a, positions, state, new, p_kv, h, valid)
                x = x + y + memory.update_and_retrieve(i, y)()
            elif is_memory and self.variant == "mag":
                m = memory.update_and_retrieve(i, a)  # runs beside the attention
                y, kn = self._attend(i, a, positions, state, new, p_kv, None, valid)
                x = x + y + m()
            elif is_memory and self.variant == "mal":
                z = a + memory.update_and_retrieve(i, a)()
                y, kn = self._attend(i, z, positions, state, new, p_kv, None, valid)
                x = x + y
            else:
                y, kn = self._attend(i, a, positions, state, new, p_kv, None, valid)
                x = x + y
            if self.uses_attention(i):
                knowledge = knowledge + kn
                n_attention += 1
            x = x + layer.feed_forward(layer.ffn_norm(x))
        return x, knowledge / max(n_attention, 1), new
