"""LLaMA backbone pieces: RMSNorm, rotary embeddings (Meta's interleaved pairs), GQA attention, SwiGLU."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_runtime.config import BackboneConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 like Meta's reference, then cast back.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """Per-pair rotation frequencies (float64), with Llama 3.1's frequency-dependent scaling if given."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotary position embedding on interleaved pairs (x[2i], x[2i+1]), as in Meta's llama/model.py."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (B, H, T, D); positions: (T,) absolute stream positions."""
        # Angles in float64: positions reach millions, where fp32 angles lose the low bits.
        angles = positions.to(torch.float64)[:, None] * self.inv_freq.to(positions.device)[None, :]
        cos = angles.cos().to(x.dtype)
        sin = angles.sin().to(x.dtype)
        pairs = x.unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, KVH, S, D) -> (B, KVH * n_rep, S, D): each kv head serves n_rep consecutive query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    """Grouped-query attention over a context of [extra tokens || window], extra = persistent + memory tokens.

    The extra tokens take part in one joint softmax with the window. `extra_gate` (per head, >= 0) scales
    their share of the softmax mass: 1 is the plain joint softmax of the paper, 0 removes them exactly
    (a converted LLaMA starts there), and the output stays differentiable in the gate at 0.
    """

    def __init__(self, cfg: BackboneConfig, extra_gate_init: float = 1.0):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.extra_gate = nn.Parameter(torch.full((cfg.n_heads,), float(extra_gate_init)))

    def _heads(self, x: Tensor, n: int) -> Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Un-rotated keys and values of x: (B, KVH, T, D) each."""
        return self._heads(self.wk(x), self.n_kv_heads), self._heads(self.wv(x), self.n_kv_heads)

    def queries(self, x: Tensor) -> Tensor:
        return self._heads(self.wq(x), self.n_heads)

    def attend(
        self,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor,
        extra_keys: Tensor | None = None,
        extra_values: Tensor | None = None,
        extra_mask: Tensor | None = None,
        n_persistent: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Returns (output (B, T, dim) after wo, attention mass on the persistent tokens (B, T)).

        q: (B, H, T, D); keys/values: (B, KVH, S, D) with mask (B|1, 1, T, S) bool, True = attend.
        extra_*: (B, KVH, E, D), extra_mask (B|1, 1, T, E); the first n_persistent extra tokens are
        the persistent memory.
        """
        rep = self.n_heads // self.n_kv_heads
        keys, values = repeat_kv(keys, rep), repeat_kv(values, rep)
        batch, _, steps, dim = q.shape
        if extra_keys is None or extra_keys.shape[2] == 0:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            knowledge = q.new_zeros(batch, steps)
            return self.wo(out.transpose(1, 2).flatten(2)), knowledge
        extra_keys, extra_values = repeat_kv(extra_keys, rep), repeat_kv(extra_values, rep)
        n_extra = extra_keys.shape[2]
        # Three probe channels appended to the values measure the softmax mass on persistent / memory /
        # window tokens. The window's share is measured, not taken as 1 - extra mass: when the extra tokens
        # dominate the softmax, that difference cancels and a closed gate no longer removes them exactly.
        probe = torch.zeros(*extra_values.shape[:3], 3, dtype=q.dtype, device=q.device)
        probe[..., :n_persistent, 0] = 1.0
        probe[..., n_persistent:, 1] = 1.0
        window_probe = torch.zeros(*values.shape[:3], 3, dtype=q.dtype, device=q.device)
        window_probe[..., 2] = 1.0
        joint_values = torch.cat(
            (torch.cat((extra_values, probe), -1), torch.cat((values, window_probe), -1)), dim=2
        )
        joint_keys = torch.cat((extra_keys, keys), dim=2)
        rows = max(extra_mask.shape[0], mask.shape[0])
        joint_mask = torch.cat(
            (extra_mask.expand(rows, -1, steps, n_extra), mask.expand(rows, -1, steps, -1)), dim=-1
        )
        joint = F.scaled_dot_product_attention(q, joint_keys, joint_values, attn_mask=joint_mask)
        out_joint, mass_p, mass_h = joint[..., :dim], joint[..., dim], joint[..., dim + 1]
        window_share = joint[..., dim + 2]
        gate = self.extra_gate.clamp(min=0.0).to(q.dtype)[None, :, None]
        ungated = not torch.is_grad_enabled() or not self.extra_gate.requires_grad
        if ungated and bool((self.extra_gate == 1).all()):
            out, knowledge = out_joint, mass_p
        else:
            # Exact re-weighting of the extra tokens' softmax share by `gate` from the joint and the
            # window-only attention: out = (A + g B) / (Za + g Zb), divided through by (Za + Zb).
            out_window = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            mass_extra = mass_p + mass_h
            extra_part = out_joint - window_share[..., None] * out_window
            denom = (window_share + gate * mass_extra).clamp_min(torch.finfo(q.dtype).tiny)
            out = (window_share[..., None] * out_window + gate[..., None] * extra_part) / denom[..., None]
            knowledge = gate * mass_p / denom
        return self.wo(out.transpose(1, 2).flatten(2)), knowledge.mean(dim=1)
