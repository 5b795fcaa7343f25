"""Neural long-term memory (LMM): a multi-head deep MLP whose weights are learned at test time.

For each token: k, v, q = projections of the input (optional causal depthwise conv, SiLU, L2-normalised
q and k); the associative loss is l(W; x_t) = ||M(k_t; W) - v_t||^2 and its gradient is the surprise.
The stream is cut into chunks of b tokens (mini-batch gradient descent):

    G_c = sum_{t in c} theta_t / b * grad l(W_c; x_t)     all gradients at the chunk-start weights W_c
    S_c = eta_c * S_{c-1} - G_c                            momentum = past surprise
    W_{c+1} = (1 - alpha_c) * W_c + S_c                    weight decay = forgetting

eta_c and alpha_c are the chunk means of the per-token gates. Tokens of chunk c read M(q_t; W_c), never
a weight that saw chunk c. The chunk gradient is a manual MLP backward written as matmuls over the
chunk (no per-token gradient tensors), differentiable for the outer training loop, and it runs under
torch.no_grad() as well. An incomplete trailing chunk stays pending in the state until it fills.
"""
from __future__ import annotations

import math
from itertools import repeat

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_runtime.config import MemoryConfig

MemoryState = dict[str, Tensor]
SCAN_SPAN = 16  # chunks per parallel span of the anchored recurrence (matmul cost grows with the span)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def memory_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fast weights and momentum stay in at least fp32, whatever the model's dtype."""
    return torch.promote_types(dtype, torch.float32)


def mlp_forward(weights: list[Tensor], x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Batched per-head MLP. weights[i]: (B, H, d_i, d_{i+1}); x: (B, H, n, d_0).

    Returns the output and, for the backward, the inputs of each layer and the pre-activations."""
    inputs, pre = [], []
    h = x
    for i, w in enumerate(weights):
        inputs.append(h)
        z = h @ w
        if i < len(weights) - 1:
            pre.append(z)
            h = F.silu(z)
        else:
            h = z
    return h, inputs, pre


class _SiluGrad(torch.autograd.Function):
    """grad * silu'(z) as one kernel (aten's silu_backward), with its own derivative: aten's has none, and the
    composite form (sigmoid, 1 - s, addcmul, mul) costs four full-size passes forward and more backward."""

    @staticmethod
    def forward(ctx, grad: Tensor, z: Tensor) -> Tensor:
        ctx.save_for_backward(grad, z)
        return torch.ops.aten.silu_backward(grad, z)

    @staticmethod
    def backward(ctx, out_grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        grad, z = ctx.saved_tensors
        grad_grad = torch.ops.aten.silu_backward(out_grad, z) if ctx.needs_input_grad[0] else None
        grad_z = None
        if ctx.needs_input_grad[1]:
            # silu''(z) = s (1 - s) (2 + z (1 - 2 s)), s = sigmoid(z); in place after three allocations.
            s = torch.sigmoid(z)
            grad_z = torch.addcmul(s, s, s, value=-1.0)                 # s (1 - s)
            grad_z.mul_(torch.rsub(s, 1.0, alpha=2.0).mul_(z).add_(2.0))  # * (2 + z (1 - 2 s))
            grad_z.mul_(grad).mul_(out_grad)
        return grad_grad, grad_z


def silu_grad(grad: Tensor, z: Tensor) -> Tensor:
    """grad * silu'(z), differentiable (through `_SiluGrad` when autograd records)."""
    if torch.is_grad_enabled() and (grad.requires_grad or z.requires_grad):
        return _SiluGrad.apply(grad, z)
    return torch.ops.aten.silu_backward(grad, z)


def mlp_backward(
    weights: list[Tensor], inputs: list[Tensor], pre: list[Tensor], out_grad: Tensor, token_weight: Tensor,
    chunks: int | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Gradients of sum_t token_weight_t * l_t for each weight, and each token's gradient norm (a metric:
    computed outside autograd, so it adds nothing to the outer loop's graph or backward).

    out_grad: the output error (proportional to dl_t/d(output_t)), (..., n, d_L); token_weight: (..., n).
    The per-token gradient of a weight is an outer product a_t^T delta_t, so its norm is
    ||a_t|| * ||delta_t|| and the weighted sum over the chunk is one matmul. With `chunks`, the n tokens
    are that many equal chunks (all at the same weights) and each weight gets one gradient per chunk:
    (..., chunks, d_i, d_{i+1})."""
    grads: list[Tensor] = [None] * len(weights)  # type: ignore[list-item]
    sq_norm = torch.zeros_like(token_weight)
    delta = out_grad
    for i in range(len(weights) - 1, -1, -1):
        a = inputs[i]
        # The token weights go on the narrower factor of the outer products (fewer multiplications).
        if a.shape[-1] <= delta.shape[-1]:
            left, right = a * token_weight[..., None], delta
        else:
            left, right = a, delta * token_weight[..., None]
        if chunks is None:
            grads[i] = left.transpose(-1, -2) @ right
        else:
            grads[i] = left.unflatten(-2, (chunks, -1)).transpose(-1, -2) @ right.unflatten(-2, (chunks, -1))
        with torch.no_grad():
            sq_norm = sq_norm + (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(delta, dim=-1)).square()
        if i > 0:
            delta = silu_grad(delta @ weights[i].transpose(-1, -2), pre[i - 1])
    return grads, sq_norm.sqrt()


def decay_products(factor: Tensor) -> tuple[Tensor, Tensor]:
    """For factors f_1..f_R (last dim): T[r, j] = prod_{i=j+1..r} f_i for j <= r (0 above the diagonal) and
    T0[r] = prod_{i<=r} f_i, from cumulative sums of logs (f clamped at 1e-30 so log stays finite)."""
    logs = factor.clamp_min(1e-30).log().cumsum(-1)
    diff = logs[..., :, None] - logs[..., None, :]
    lower = torch.ones(diff.shape[-2:], dtype=torch.bool, device=factor.device).tril()
    return torch.where(lower, diff, torch.full_like(diff, -math.inf)).exp(), logs.exp()


class _Recomputed(torch.autograd.Function):
    """fn's activations recomputed in the backward instead of kept: the forward runs fn without autograd (no
    graph, no saved activations, faster than recording one), the backward runs it again with autograd and
    differentiates that, under the forward's autocast. Unlike torch's re-entrant checkpoint it works with
    torch.autograd.grad, since every tensor fn differentiates must be one of its inputs; unlike the
    non-reentrant one its forward records nothing. fn returns a tuple of tensors."""

    @staticmethod
    def forward(ctx, fn, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.fn = fn
        ctx.save_for_backward(*tensors)
        ctx.device = tensors[0].device.type
        ctx.autocast = torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device)
        with torch.no_grad():
            outs = fn(*tensors)
        # An output that shares an input's memory (a slice of it) is copied: autograd owns Function outputs.
        shared = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
        outs = tuple(o.clone() if o.numel() and o.untyped_storage().data_ptr() in shared else o for o in outs)
        ctx.mark_non_differentiable(*(o for o in outs if not o.is_floating_point()))
        return outs

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph: the recomputed graph starts from detached inputs
            raise RuntimeError("a recomputed memory block has first-order gradients only; for higher orders set "
                               "memory.block_tokens: null")
        tensors = ctx.saved_tensors
        wanted = [i for i, t in enumerate(tensors) if ctx.needs_input_grad[1 + i]]
        inputs = [t.detach().requires_grad_(ctx.needs_input_grad[1 + i]) for i, t in enumerate(tensors)]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device, dtype=dtype, enabled=enabled):
            outs = ctx.fn(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    allow_unused=True) if pairs and wanted else ()
        result: list[Tensor | None] = [None] * len(tensors)
        for i, g in zip(wanted, found):
            result[i] = g
        return (None, *result)


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv over time whose last (kernel - 1) inputs are carried in the stream state."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        weight = torch.zeros(channels, 1, kernel)
        weight[:, 0, -1] = 1.0  # starts as the identity
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, C); tail: (B, kernel - 1, C). Returns (y, new tail)."""
        full = torch.cat((tail.to(x.dtype), x), dim=1)
        weight = self.weight[:, 0].to(x.dtype)  # (C, kernel)
        steps = x.shape[1]
        # A few shifted multiply-adds: several times faster than a depthwise conv1d at these sizes.
        y = full[:, :steps] * weight[:, 0]
        for j in range(1, self.kernel):
            y = y + full[:, j:j + steps] * weight[:, j]
        return y, full[:, full.shape[1] - (self.kernel - 1):]


class NeuralMemory(nn.Module):
    """One memory layer's LMM. Per-stream state is a dict of tensors (fast weights, momentum, conv
    tails, pending partial chunk, tokens seen, MAC segment snapshot)."""

    def __init__(self, model_dim: int, cfg: MemoryConfig, segment_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.heads
        self.dim = cfg.dim or model_dim
        self.head_dim = self.dim // cfg.heads
        self.chunk = cfg.chunk_size
        self.segment_len = segment_len  # MAC: retrieve() reads the weights held at the segment start
        self.to_q = nn.Linear(model_dim, self.dim, bias=False)
        self.to_k = nn.Linear(model_dim, self.dim, bias=False)
        self.to_v = nn.Linear(model_dim, self.dim, bias=False)
        if cfg.conv_kernel > 1:
            self.conv_q = CausalDepthwiseConv(self.dim, cfg.conv_kernel)
            self.conv_k = CausalDepthwiseConv(self.dim, cfg.conv_kernel)
            self.conv_v = CausalDepthwiseConv(self.dim, cfg.conv_kernel)
            if cfg.induction_init:
                self._init_induction_prior()
        # Data-dependent gates per head: step size theta, momentum eta, forgetting alpha.
        self.to_gates = nn.Linear(model_dim, 3 * cfg.heads)
        nn.init.zeros_(self.to_gates.weight)
        with torch.no_grad():
            bias = self.to_gates.bias.view(3, cfg.heads)
            bias[0] = _logit(cfg.theta_init / cfg.theta_max)
            bias[1] = _logit(cfg.eta_init)
            bias[2] = _logit(cfg.alpha_init)
        hidden = max(1, int(round(self.head_dim * cfg.hidden_mult)))
        sizes = [self.head_dim] + [hidden] * (cfg.depth - 1) + [self.head_dim]
        initial = [torch.randn(cfg.heads, d_in, d_out) / math.sqrt(d_in) for d_in, d_out in zip(sizes[:-1], sizes[1:])]
        if cfg.empty_init:
            # A fresh memory reads 0 and its last layer's starting point stays 0 (a buffer, not learned):
            # every read is what the stream wrote, so the outer loop cannot turn the initial weights into one
            # more static MLP and ignore the test-time updates.
            self.initial_weights = nn.ParameterList(nn.Parameter(w) for w in initial[:-1])
            self.register_buffer("initial_last", torch.zeros_like(initial[-1]), persistent=False)
        else:
            self.initial_weights = nn.ParameterList(nn.Parameter(w) for w in initial)
            self.initial_last = None
        self.out_proj = nn.Linear(self.dim, model_dim, bias=False)
        self.out_gate = nn.Linear(model_dim, model_dim)
        nn.init.zeros_(self.out_gate.weight)
        nn.init.zeros_(self.out_gate.bias)
        # Output gate scale: 0 closes the memory exactly (a converted LLaMA starts closed), learnable.
        self.output_scale = nn.Parameter(torch.full((model_dim,), float(cfg.output_gate_init)))

    @torch.no_grad()
    def _init_induction_prior(self) -> None:
        """Start q and k as the same projection, channel c of the query looking back lag_c tokens and the
        key lag_c + 1: the key written at token t then describes the context just before t, the query at
        t describes the context ending at t, so a repeated context reads the value (token) that followed
        it last time. Only the starting point: training moves every weight from here."""
        kernel = self.cfg.conv_kernel
        self.to_k.weight.copy_(self.to_q.weight)
        lag = torch.arange(self.dim) % (kernel - 1)
        for conv, shift in ((self.conv_q, 0), (self.conv_k, 1)):
            conv.weight.zero_()
            conv.weight[torch.arange(self.dim), 0, kernel - 1 - lag - shift] = 1.0

    def initial_layers(self) -> list[Tensor]:
        """The weights every stream starts from: the learned ones (and the fixed zero last layer)."""
        return list(self.initial_weights) + ([self.initial_last] if self.initial_last is not None else [])

    @property
    def depth(self) -> int:
        return len(self.initial_layers())

    @property
    def has_conv(self) -> bool:
        return self.cfg.conv_kernel > 1

    # ----------------------------------------------------------------------------------------- state
    def initial_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> MemoryState:
        """Fresh per-stream state: W = the learned initial weights (keeps their graph), zero momentum."""
        device = self.to_q.weight.device if device is None else device  # default: where the module is
        mdt = memory_dtype(dtype)
        state: MemoryState = {}
        for i, w0 in enumerate(self.initial_layers()):
            state[f"w{i}"] = w0.to(device=device, dtype=mdt).unsqueeze(0).expand(batch, *w0.shape)
            state[f"s{i}"] = torch.zeros(batch, *w0.shape, device=device, dtype=mdt)
        if self.has_conv:
            k = self.cfg.conv_kernel - 1
            for name in ("q", "k", "v", "read"):
                state[f"conv_{name}"] = torch.zeros(batch, k, self.dim, device=device, dtype=dtype)
        h, d = self.heads, self.head_dim
        state["pending_k"] = torch.zeros(batch, h, 0, d, device=device, dtype=mdt)
        state["pending_v"] = torch.zeros(batch, h, 0, d, device=device, dtype=mdt)
        state["pending_gates"] = torch.zeros(batch, h, 0, 4, device=device, dtype=mdt)  # theta, eta, alpha, valid
        state["seen"] = torch.zeros((), dtype=torch.int64)
        return state

    def weights(self, state: MemoryState, prefix: str = "w") -> list[Tensor]:
        return [state[f"{prefix}{i}"] for i in range(self.depth)]

    # ----------------------------------------------------------------------------------- projections
    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _project(self, proj: nn.Linear, conv_name: str, x: Tensor, state: MemoryState, new: MemoryState,
                 normalise: bool) -> Tensor:
        y = proj(x)
        if self.has_conv:
            conv = getattr(self, f"conv_{conv_name}") if conv_name != "read" else self.conv_q
            y, new[f"conv_{conv_name}"] = conv(y, state[f"conv_{conv_name}"])
        y = self._split_heads(F.silu(y))
        if normalise:
            y = F.normalize(y, dim=-1)
        return y

    def _output(self, read: Tensor, x: Tensor | None, valid: Tensor | None = None) -> Tensor:
        """Reads (B, H, T, d) -> (B, T, model_dim): projected, then gated by x (MAG/MAL/MAC update path);
        padding (valid False) outputs 0."""
        out = self.out_proj(read.transpose(1, 2).flatten(2).to(self.out_proj.weight.dtype))
        if x is None:
            return out
        out = out * torch.sigmoid(self.out_gate(x)) * self.output_scale
        if valid is not None:
            out = out * valid[..., None].to(out.dtype)
        return out.to(x.dtype)

    def _update_scale(self, grads: list[Tensor] | tuple[Tensor, ...]) -> Tensor | None:
        """The factor (..., ) that caps a chunk's update norm (per stream and head, over all layers) at
        max_update_norm: a burst of surprise moves the fast weights a bounded step, so the inner loop cannot
        run away. None when there is no cap."""
        cap = self.cfg.max_update_norm
        if cap is None:
            return None
        # vector_norm: one reduction pass, no squared copy; clamp: finite backward at 0.
        sq = sum(torch.linalg.vector_norm(g, dim=(-2, -1)).square() for g in grads)
        return (cap / sq.clamp_min(1e-24).sqrt()).clamp(max=1.0)

    def _bounded(self, grads: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]:
        """A chunk's update, its norm capped (see `_update_scale`)."""
        scale = self._update_scale(grads)
        return list(grads) if scale is None else [g * scale[..., None, None] for g in grads]

    def _scan_coefficients(self, eta: Tensor, keep: Tensor, on: Tensor) -> Tensor:
        """The chunk recurrence S_r = eta_r S_{r-1} - G_r, W_r = keep_r W_{r-1} + on_r S_r over a span of R
        chunks as one linear map: [W_0, ..., W_R, S_R] = C @ [W_0, S_0, G_1, ..., G_R], C (..., R + 2, R + 2).
        eta, keep, on: (..., R). Momentum and forgetting are folded into C, so the span is one matmul."""
        span = eta.shape[-1]
        carry_s, carry_s0 = decay_products(eta)
        carry_w, carry_w0 = decay_products(keep)
        written = carry_w * on[..., None, :]  # W_r = carry_w0[r] W_0 + sum_{i<=r} carry_w[r, i] on_i S_i
        w_rows = torch.cat((carry_w0[..., None], written @ carry_s0[..., None], -(written @ carry_s)), dim=-1)
        s_row = torch.cat((torch.zeros_like(carry_s0[..., -1:]), carry_s0[..., -1:], -carry_s[..., -1, :]), dim=-1)
        first = F.one_hot(torch.zeros_like(eta[..., 0], dtype=torch.long), span + 2).to(eta.dtype)  # W_0
        return torch.cat((first[..., None, :], w_rows, s_row[..., None, :]), dim=-2)

    def _scan_run(self, weights: list[Tensor], momentum: list[Tensor], grads: list[Tensor], eta: Tensor,
                  keep: Tensor, on: Tensor, padded: bool,
                  queries: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """A run of R chunks whose gradients are all known (anchored): the recurrence cut into spans of
        SCAN_SPAN chunks (matmul cost R * span rather than R^2), in two passes. Every span's own gradients
        reach its end through one batched matmul over all spans; only the span-start weights and momentum
        are chained span by span (a few small ops per span); then every chunk's weights come from its span's
        start and steps in one batched matmul, and each chunk's queries read the weights before that chunk,
        all chunks in one batched MLP forward.

        grads: per layer (B, H, R, d_in, d_out); eta, keep, on: (B, H, R); queries (B, H, R, b, d). Returns the
        reads (B, H, R * b, d) and the final weights and momentum."""
        # The update cap scales each chunk's step: folded into the coefficients' step columns below rather
        # than applied to the full-size gradients (a write and, in the backward, a read of each saved).
        scale = self._update_scale(grads)
        steps = list(grads)
        runs = eta.shape[-1]
        spans = -(-runs // SCAN_SPAN)
        extra = spans * SCAN_SPAN - runs
        if extra:  # pad to whole spans with padding chunks (on = 0, no step): they leave the memory as it was
            eta, keep, on = (F.pad(g, (0, extra)) for g in (eta, keep, on))
            steps = [F.pad(g, (0, 0, 0, 0, 0, extra)) for g in steps]
            scale = None if scale is None else F.pad(scale, (0, extra))
            padded = True
        if not self.cfg.momentum:  # S_r = -G_r: the recurrence with eta = 0 (factors clamped at 1e-30)
            eta = torch.zeros_like(eta)
        if not self.cfg.decay:
            keep = torch.ones_like(keep)
        if padded:  # a chunk of padding leaves the memory as it was: no step (its G is 0), eta = keep = 1
            eta, keep = on * eta + (1.0 - on), on * keep + (1.0 - on)
        else:
            on = torch.ones_like(on)
        # (B, H, spans, span + 2, span + 2): rows W_0..W_span, S_span; columns W_0, S_0, G_1..G_span.
        coefficients = self._scan_coefficients(*(g.unflatten(-1, (spans, SCAN_SPAN)) for g in (eta, keep, on)))
        # Coefficient blocks, contiguous (a strided operand slows the batched matmuls): rows of the reads
        # (W_0..W_{span-1}) and of the span's end (W_span, S_span); columns of [W_0, S_0] and of the steps.
        blocks = [part.contiguous() for rows in coefficients.split([SCAN_SPAN, 2], dim=-2)
                  for part in rows.split([2, SCAN_SPAN], dim=-1)]
        start_reads, step_reads, start_ends, step_ends = blocks
        if scale is not None:
            column_scale = scale.unflatten(-1, (spans, SCAN_SPAN))[..., None, :]
            step_reads, step_ends = step_reads * column_scale, step_ends * column_scale
        read_coefficients = torch.cat((start_reads, step_reads), dim=-1)
        read_weights, weights, momentum = [], list(weights), list(momentum)
        for i, step in enumerate(steps):
            shape = step.shape[-2:]
            span_steps = step.flatten(-2).unflatten(2, (spans, SCAN_SPAN))  # (B, H, spans, span, d_in * d_out)
            # Each span's own steps at its end, as if it started from W = S = 0, then the starts chained.
            local_ends = (step_ends @ span_steps).unbind(2)
            starts = []
            for span in range(spans):
                start = torch.stack((weights[i].flatten(-2), momentum[i].flatten(-2)), dim=2)  # (B, H, 2, d_in * d_out)
                starts.append(start)
                w, m = (start_ends[:, :, span] @ start + local_ends[span]).unbind(2)
                weights[i], momentum[i] = w.unflatten(-1, shape), m.unflatten(-1, shape)
            # Chunk r reads W_{r-1}: its span's start [W, S] and own steps through the read rows of C.
            rows = (read_coefficients @ torch.cat((torch.stack(starts, dim=2), span_steps), dim=3)).flatten(2, 3)
            read_weights.append((rows[:, :, :runs] if extra else rows).unflatten(-1, shape))
        reads = mlp_forward(read_weights, queries)[0]
        return reads.flatten(2, 3), weights, momentum

    # ------------------------------------------------------------------------------------ operations
    def retrieve(self, x: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
        """M*(q(x)) without update (the MAC read h). With a MAC segment length, every token of a segment
        reads the weights held at that segment's start. Returns (h (B, T, dim), new state)."""
        new = dict(state)
        q = self._project(self.to_q, "read", x, state, new, normalise=True)
        weights = self.weights(state)
        if self.segment_len is not None:
            seen = int(state["seen"])
            if seen % self.segment_len == 0:
                for i, w in enumerate(weights):
                    new[f"segment_w{i}"] = w
            weights = self.weights(new, "segment_w")
        out, _, _ = mlp_forward(weights, q.to(weights[0].dtype))
        return self._output(out, None).to(x.dtype), new

    def update_and_retrieve(
        self, x: Tensor, state: MemoryState, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor, MemoryState]:
        """Write x into the memory and read it (see `_update_and_retrieve`). A call longer than
        `block_tokens` runs block by block with the state carried (exact: any split gives the same result);
        under autograd each block is recomputed in the backward instead of keeping its activations, so
        the memory of a long call is bounded by one block in training as in inference."""
        block = self.cfg.block_tokens
        if block is None or x.shape[1] <= block:
            return self._update_and_retrieve(x, state, valid)
        outs, surprises = [], []
        for xb, vb in zip(x.split(block, dim=1), valid.split(block, dim=1) if valid is not None else repeat(None)):
            if torch.is_grad_enabled():
                # Only the memory itself is recomputed: the projections around it (a fraction of its
                # activations, most of the recompute's matmul work) keep theirs.
                new = dict(state)
                q, k, v, gates = self._inputs(xb, state, new, vb)
                read, surprise, state = self._recomputed_write_read(q, k, v, gates, new)
                out = self._output(read, xb, vb)
            else:
                out, surprise, state = self._update_and_retrieve(xb, state, vb)
            outs.append(out)
            surprises.append(surprise)
        return torch.cat(outs, dim=1), torch.cat(surprises, dim=1), state

    def _recomputed_write_read(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor,
                               state: MemoryState) -> tuple[Tensor, Tensor, MemoryState]:
        """`_write_read` whose activations are recomputed in the backward instead of kept (see `_Recomputed`).
        Every tensor it differentiates is an explicit input: q, k, v, gates and the state (no parameters)."""
        keys = list(state)
        changed: list[str] = []

        def run(*tensors: Tensor) -> tuple[Tensor, ...]:
            inputs = dict(zip(keys, tensors[4:]))
            read, surprise, new = self._write_read(*tensors[:4], inputs)
            # Only what the call changed leaves the Function (an input passed through stays outside it).
            changed[:] = [key for key in new if new[key] is not inputs.get(key)]
            return (read, surprise, *(new[key] for key in changed))

        outs = _Recomputed.apply(run, q, k, v, gates, *state.values())
        return outs[0], outs[1], {**state, **dict(zip(changed, outs[2:]))}

    def _update_and_retrieve(
        self, x: Tensor, state: MemoryState, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor, MemoryState]:
        """Write x into the memory chunk by chunk and read each token at its chunk-start weights.

        x: (B, T, model_dim); valid: optional (B, T) bool, False for padding (no write, no read).
        Returns (gated output (B, T, model_dim), surprise (B, T) = per-token gradient norm averaged over
        heads, new state)."""
        new = dict(state)
        read, surprise, new = self._write_read(*self._inputs(x, state, new, valid), new)
        return self._output(read, x, valid), surprise, new

    def _inputs(self, x: Tensor, state: MemoryState, new: MemoryState,
                valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (B, H, T, d) and the per-token gates (B, H, T, 4): theta, eta, alpha, valid. The conv
        tails go into `new`."""
        mdt = state["w0"].dtype
        q = self._project(self.to_q, "q", x, state, new, normalise=True).to(mdt)
        k = self._project(self.to_k, "k", x, state, new, normalise=True).to(mdt)
        v = self._project(self.to_v, "v", x, state, new, normalise=False).to(mdt)
        gates = torch.sigmoid(self.to_gates(x).to(mdt)).unflatten(-1, (3, self.heads))  # (B, T, 3, H)
        theta = gates[:, :, 0] * self.cfg.theta_max
        eta, alpha = gates[:, :, 1], gates[:, :, 2]
        ok = torch.ones_like(theta) if valid is None else valid.to(mdt)[..., None].expand_as(theta)
        return q, k, v, torch.stack((theta, eta, alpha, ok), dim=-1).transpose(1, 2)

    def _write_read(self, q: Tensor, k: Tensor, v: Tensor, new_gates: Tensor,
                    state: MemoryState) -> tuple[Tensor, Tensor, MemoryState]:
        """The memory proper on projected inputs (see `_inputs`): writes them chunk by chunk and reads the
        queries. Returns (reads (B, H, T, d), surprise (B, T), new state)."""
        new = dict(state)
        mdt = state["w0"].dtype
        n_pending = state["pending_k"].shape[2]
        # After the pending tokens (no copy when none are pending, the common case of whole-chunk calls).
        keys, values, all_gates = (new_part if pending.shape[2] == 0 else torch.cat((pending, new_part), dim=2)
                                   for pending, new_part in ((state["pending_k"], k), (state["pending_v"], v),
                                                             (state["pending_gates"], new_gates)))
        total = keys.shape[2]
        weights = self.weights(state)
        momentum = self.weights(state, "s")
        b = self.chunk
        n_full = total // b
        # Per-chunk gates for every complete chunk at once (fewer small ops inside the sequential loop).
        full = all_gates[:, :, :n_full * b].unflatten(2, (n_full, b))  # (B, H, n_full, b, 4)
        on = full[..., 3]
        n_valid = on.sum(-1)
        denom = n_valid.clamp_min(1.0)
        eta_full = (full[..., 1] * on).sum(-1) / denom                 # (B, H, n_full)
        keep_full = 1.0 - (full[..., 2] * on).sum(-1) / denom
        padded = bool((n_valid < b).any()) if n_full else False
        on_full = (n_valid > 0).to(mdt)
        eta_c, keep_c, chunk_on = (t[..., None, None].unbind(2) for t in (eta_full, keep_full, on_full))
        # d l_t / d M(k_t) = 2 (M(k_t) - v_t): the factor 2 goes into the token weights and the norms.
        token_weight = all_gates[..., 0] * all_gates[..., 3] * (2.0 / b)
        anchor_every = self.cfg.anchor_every
        written = (int(state["seen"]) - n_pending) // b  # complete chunks already in the weights
        anchor = self.weights(state, "anchor_w") if anchor_every > 1 and written % anchor_every else None
        n_chunks = n_full + (1 if total > n_full * b else 0)
        # Runs of chunks that share one gradient anchor (one chunk each for exact descent). Every tensor is
        # split once up front: slicing it per chunk would make each chunk's backward zero-fill the whole.
        runs, c = [], 0
        while c < n_chunks:
            run = 1 if anchor_every == 1 or c == n_full else min(n_full - c, anchor_every - (written + c) % anchor_every)
            runs.append((c, run))
            c += run
        run_tokens = [min((c + run) * b, total) - c * b for c, run in runs]
        key_runs, value_runs, weight_runs = ((t,) if len(runs) == 1 else t.split(run_tokens, dim=2)
                                             for t in (keys, values, token_weight))
        # Queries of the new tokens per chunk (pending tokens were read when they arrived), split only where a
        # chunk reads alone: an anchored run reads its queries as one slice.
        q_chunks = (q.split([min(s + b, total) - max(s, n_pending) for s in range(0, total, b)], dim=2)
                    if anchor_every == 1 or any(run == 1 for _, run in runs) else None)
        reads, surprises = [], []
        for (c, run), run_keys, run_values, run_weight in zip(runs, key_runs, value_runs, weight_runs):
            start = c * b
            if anchor_every == 1:
                # Exact mini-batch descent: read and take gradients at the same (current) weights.
                n_keys = run_keys.shape[2]
                out, inputs, pre = mlp_forward(weights, torch.cat((run_keys, q_chunks[c]), dim=2))
                reads.append(out[:, :, n_keys:])
                grads, grad_norm = mlp_backward(
                    weights, [a[:, :, :n_keys] for a in inputs], [z[:, :, :n_keys] for z in pre],
                    out[:, :, :n_keys] - run_values, run_weight)
                chunk_grads = [grads]
            else:
                # Anchored: every chunk of a window of `anchor_every` chunks takes its gradient at the
                # window-start weights, so all of them are one batched backward.
                if (written + c) % anchor_every == 0:
                    anchor = list(weights)
                # One matmul over the run's tokens per layer; only the weight gradients are per chunk.
                out, inputs, pre = mlp_forward(anchor, run_keys)
                grads, grad_norm = mlp_backward(anchor, inputs, pre, out - run_values, run_weight, chunks=run)
                chunk_grads = [[g[:, :, 0] for g in grads]] if run == 1 else []
            surprises.append(2.0 * grad_norm[:, :, max(start, n_pending) - start:])
            if run > 1:  # every gradient of the run is known: momentum, forgetting and reads in parallel
                window_gates = (eta_full[..., c:c + run], keep_full[..., c:c + run], on_full[..., c:c + run])
                pad = max(0, n_pending - start)  # pending queries were read when they arrived
                first, last = start + pad - n_pending, start + run * b - n_pending  # the run's new tokens in q
                queries = q if (first, last) == (0, q.shape[2]) else q[:, :, first:last]
                if pad:
                    queries = F.pad(queries, (0, 0, pad, 0))
                out, weights, momentum = self._scan_run(weights, momentum, grads, *window_gates, padded,
                                                        queries.unflatten(2, (run, b)))
                reads.append(out[:, :, pad:])
                continue
            for j in range(run):
                if anchor_every > 1:  # reads at the current weights, chunk by chunk
                    reads.append(mlp_forward(weights, q_chunks[c + j])[0])
                if c + j == n_full:  # incomplete chunk: read now, write when it fills
                    break
                step = self._bounded(chunk_grads[j])
                for i in range(self.depth):
                    s = eta_c[c + j] * momentum[i] - step[i] if self.cfg.momentum else -step[i]
                    w = keep_c[c + j] * weights[i] + s if self.cfg.decay else weights[i] + s
                    if padded:  # a chunk of padding only leaves the memory as it was
                        s = chunk_on[c + j] * s + (1.0 - chunk_on[c + j]) * momentum[i]
                        w = chunk_on[c + j] * w + (1.0 - chunk_on[c + j]) * weights[i]
                    momentum[i], weights[i] = s, w
        start = n_full * b
        if anchor is not None:
            for i, w in enumerate(anchor):
                new[f"anchor_w{i}"] = w
        new["pending_k"] = keys[:, :, start:]
        new["pending_v"] = values[:, :, start:]
        new["pending_gates"] = all_gates[:, :, start:]
        for i in range(self.depth):
            new[f"w{i}"] = weights[i]
            new[f"s{i}"] = momentum[i]
        new["seen"] = state["seen"] + q.shape[2]
        return torch.cat(reads, dim=2), torch.cat(surprises, dim=2).mean(dim=1), new
