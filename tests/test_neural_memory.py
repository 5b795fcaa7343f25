"""The chunked LMM update equals a naive token-by-token reference written with autograd (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titans_runtime.config import MemoryConfig
from titans_runtime.model.neural_memory import NeuralMemory

DIM = 24


def make_memory(depth: int, chunk: int, momentum: bool = True, decay: bool = True, conv: int = 0,
                segment: int | None = None, anchor: int = 1, cap: float | None = None) -> NeuralMemory:
    torch.manual_seed(0)
    cfg = MemoryConfig(heads=2, depth=depth, chunk_size=chunk, conv_kernel=conv, momentum=momentum, decay=decay,
                       theta_init=0.3, eta_init=0.8, alpha_init=0.05, anchor_every=anchor, max_update_norm=cap)
    mem = NeuralMemory(DIM, cfg, segment).double()
    with torch.no_grad():  # data-dependent gates, an open output gate, a non-trivial conv
        mem.to_gates.weight.normal_(0.0, 0.3)
        mem.out_gate.weight.normal_(0.0, 0.1)
        if conv:
            for c in (mem.conv_q, mem.conv_k, mem.conv_v):
                c.weight.normal_(0.0, 0.5)
    return mem


def reference_projection(mem: NeuralMemory, proj, conv, x: torch.Tensor, normalise: bool) -> torch.Tensor:
    """Linear -> causal depthwise conv (explicit loop) -> SiLU -> heads -> optional L2 norm."""
    y = proj(x)
    if conv is not None:
        kernel = conv.weight[:, 0, :]  # (C, K)
        padded = torch.cat((torch.zeros(y.shape[0], kernel.shape[1] - 1, y.shape[2], dtype=y.dtype), y), dim=1)
        y = torch.stack([(padded[:, t:t + kernel.shape[1]] * kernel.T).sum(1) for t in range(y.shape[1])], dim=1)
    y = F.silu(y).unflatten(-1, (mem.heads, mem.head_dim)).transpose(1, 2)
    return F.normalize(y, dim=-1) if normalise else y


def memory_mlp(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for i, w in enumerate(weights):
        x = x @ w
        if i < len(weights) - 1:
            x = F.silu(x)
    return x


def reference_inputs(mem: NeuralMemory, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, T, d) and the per-token gates theta, eta, alpha (B, T, H), written independently."""
    conv = mem.cfg.conv_kernel > 1
    q = reference_projection(mem, mem.to_q, mem.conv_q if conv else None, x, True)
    k = reference_projection(mem, mem.to_k, mem.conv_k if conv else None, x, True)
    v = reference_projection(mem, mem.to_v, mem.conv_v if conv else None, x, False)
    gates = torch.sigmoid(mem.to_gates(x)).unflatten(-1, (3, mem.heads))
    return q, k, v, gates[:, :, 0] * mem.cfg.theta_max, gates[:, :, 1], gates[:, :, 2]


def naive_reference(mem: NeuralMemory, x: torch.Tensor):
    """Token by token: each token's gradient by autograd at its chunk-start weights, summed per chunk,
    then momentum and decay once per chunk. Returns (outputs, surprise, final weights, final momentum)."""
    cfg = mem.cfg
    q, k, v, theta, eta, alpha = reference_inputs(mem, x)
    batch, steps = x.shape[:2]
    b = cfg.chunk_size
    outputs = torch.zeros(batch, mem.heads, steps, mem.head_dim, dtype=x.dtype)
    surprise = torch.zeros(batch, mem.heads, steps, dtype=x.dtype)
    weights = [w.detach().clone().unsqueeze(0).repeat(batch, 1, 1, 1) for w in mem.initial_layers()]
    momentum = [torch.zeros_like(w) for w in weights]
    for n in range(batch):
        for h in range(mem.heads):
            W = [w[n, h].clone() for w in weights]
            S = [s[n, h].clone() for s in momentum]
            for c0 in range(0, steps, b):
                if (c0 // b) % cfg.anchor_every == 0:
                    anchor = [w.clone() for w in W]  # gradients of the next anchor_every chunks are taken here
                grads = [torch.zeros_like(w) for w in W]
                chunk = range(c0, min(c0 + b, steps))
                for t in chunk:
                    outputs[n, h, t] = memory_mlp(W, q[n, h, t])
                    with torch.enable_grad():
                        leaves = [w.detach().requires_grad_(True) for w in anchor]
                        loss = (memory_mlp(leaves, k[n, h, t]) - v[n, h, t]).pow(2).sum()
                        token_grads = torch.autograd.grad(loss, leaves)
                    surprise[n, h, t] = torch.sqrt(sum(g.pow(2).sum() for g in token_grads))
                    for g_sum, g in zip(grads, token_grads):
                        g_sum += theta[n, t, h] / b * g
                if len(chunk) < b:
                    break  # an incomplete chunk is read but not yet written
                if cfg.max_update_norm is not None:  # the chunk's whole update, capped in norm
                    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                    grads = [g * min(1.0, cfg.max_update_norm / float(norm)) for g in grads]
                eta_c = eta[n, list(chunk), h].mean()
                alpha_c = alpha[n, list(chunk), h].mean()
                for i in range(len(W)):
                    S[i] = (eta_c * S[i] if cfg.momentum else 0.0) - grads[i]
                    W[i] = ((1 - alpha_c) * W[i] if cfg.decay else W[i]) + S[i]
            for i in range(len(W)):
                weights[i][n, h] = W[i]
                momentum[i][n, h] = S[i]
    out = mem._output(outputs, x)
    return out, surprise.mean(1), weights, momentum


CASES = [
    dict(depth=1, chunk=1), dict(depth=1, chunk=4), dict(depth=1, chunk=5, momentum=False, decay=False),
    dict(depth=2, chunk=4), dict(depth=2, chunk=8, momentum=False), dict(depth=2, chunk=3, decay=False),
    dict(depth=3, chunk=4, conv=3), dict(depth=2, chunk=6, conv=4),
    dict(depth=2, chunk=2, anchor=3), dict(depth=1, chunk=4, anchor=2, conv=3), dict(depth=2, chunk=3, anchor=8),
    dict(depth=2, chunk=2, anchor=4, momentum=False), dict(depth=2, chunk=2, anchor=5, decay=False),
    dict(depth=2, chunk=1, anchor=20, conv=3),  # a run of 20 chunks: chained scan spans
    dict(depth=2, chunk=4, cap=0.5), dict(depth=1, chunk=2, cap=1.0, anchor=3),  # caps that bind on some chunks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_chunked_update_equals_naive_token_loop(case):
    mem = make_memory(**case)
    x = torch.randn(2, 22, DIM, dtype=torch.float64)  # 22: the last chunk stays incomplete for most sizes
    with torch.no_grad():
        out, surprise, state = mem.update_and_retrieve(x, mem.initial_state(2, dtype=torch.float64))
        ref_out, ref_surprise, ref_w, ref_s = naive_reference(mem, x)
    torch.testing.assert_close(out, ref_out, atol=1e-8, rtol=0)
    torch.testing.assert_close(surprise, ref_surprise, atol=1e-8, rtol=0)
    for i in range(mem.depth):
        torch.testing.assert_close(state[f"w{i}"], ref_w[i], atol=1e-8, rtol=0)
        torch.testing.assert_close(state[f"s{i}"], ref_s[i], atol=1e-8, rtol=0)
    assert state["pending_k"].shape[2] == 22 % case["chunk"]


@pytest.mark.parametrize("anchor", [1, 3])
@pytest.mark.parametrize("splits", [[22], [1, 21], [3, 5, 7, 7], [8, 8, 6], [11, 11]])
def test_any_split_of_the_stream_gives_the_same_memory(splits, anchor):
    mem = make_memory(depth=2, chunk=2, conv=3, anchor=anchor)
    x = torch.randn(1, sum(splits), DIM, dtype=torch.float64)
    with torch.no_grad():
        whole, whole_surprise, whole_state = mem.update_and_retrieve(x, mem.initial_state(1, dtype=torch.float64))
        state, outs, surprises, start = mem.initial_state(1, dtype=torch.float64), [], [], 0
        for n in splits:
            out, s, state = mem.update_and_retrieve(x[:, start:start + n], state)
            outs.append(out)
            surprises.append(s)
            start += n
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cat(surprises, 1), whole_surprise, atol=1e-10, rtol=0)
    for key in whole_state:
        torch.testing.assert_close(state[key], whole_state[key], atol=1e-10, rtol=0)


@pytest.mark.parametrize("conv", [0, 3])
def test_retrieval_never_sees_its_own_chunk_or_later(conv):
    mem = make_memory(depth=2, chunk=4, conv=conv)
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    with torch.no_grad():
        base, _, _ = mem.update_and_retrieve(x, mem.initial_state(1, dtype=torch.float64))
        for t in (5, 8, 13, 19):
            changed = x.clone()
            changed[:, t] += torch.randn(DIM, dtype=torch.float64)
            out, _, _ = mem.update_and_retrieve(changed, mem.initial_state(1, dtype=torch.float64))
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)  # the past is untouched
            chunk_end = min((t // 4 + 1) * 4, 20)
            if conv == 0:
                # Later tokens of the same chunk read the chunk-start weights: token t is not in them yet.
                torch.testing.assert_close(out[:, t + 1:chunk_end], base[:, t + 1:chunk_end], atol=0, rtol=0)
            if chunk_end < 20:  # ...while the chunks after it do read what token t wrote
                assert not torch.allclose(out[:, chunk_end:], base[:, chunk_end:])


def test_reads_within_a_chunk_use_chunk_start_weights():
    """With conv off, changing a token's key/value (not its query) leaves every read of its chunk as is."""
    mem = make_memory(depth=2, chunk=4)
    x = torch.randn(1, 16, DIM, dtype=torch.float64)
    with torch.no_grad():
        state0 = mem.initial_state(1, dtype=torch.float64)
        base, _, _ = mem.update_and_retrieve(x, state0)
        # Tokens 4..7 read W_1: the weights after exactly the first chunk (tokens 0..3).
        q = reference_projection(mem, mem.to_q, None, x, True)
        _, _, state_after_4 = mem.update_and_retrieve(x[:, :4], mem.initial_state(1, dtype=torch.float64))
        w = [state_after_4[f"w{i}"] for i in range(mem.depth)]
        expected = mem._output(memory_mlp(w, q[:, :, 4:8]), x[:, 4:8])
    torch.testing.assert_close(base[:, 4:8], expected, atol=1e-12, rtol=0)


def test_mac_retrieve_reads_segment_start_weights():
    mem = make_memory(depth=2, chunk=4, segment=8)
    x = torch.randn(1, 16, DIM, dtype=torch.float64)
    with torch.no_grad():
        state = mem.initial_state(1, dtype=torch.float64)
        h0, state = mem.retrieve(x[:, :6], state)               # segment 0 starts: snapshot = initial weights
        _, _, state = mem.update_and_retrieve(x[:, :6], state)  # one chunk written
        h1, state = mem.retrieve(x[:, 6:8], state)              # still segment 0: still the initial weights
        q = reference_projection(mem, mem.to_q, None, x, True)
        init = [w.unsqueeze(0) for w in mem.initial_layers()]
        torch.testing.assert_close(h0, mem._output(memory_mlp(init, q[:, :, :6]), None), atol=1e-12, rtol=0)
        torch.testing.assert_close(h1, mem._output(memory_mlp(init, q[:, :, 6:8]), None), atol=1e-12, rtol=0)
        _, _, state = mem.update_and_retrieve(x[:, 6:8], state)
        h2, state = mem.retrieve(x[:, 8:12], state)             # segment 1: the weights after 8 tokens
        now = [state[f"w{i}"] for i in range(mem.depth)]
        torch.testing.assert_close(h2, mem._output(memory_mlp(now, q[:, :, 8:12]), None), atol=1e-12, rtol=0)


def test_update_cap_bounds_every_chunk_step_and_binds_here():
    """The capped cases above are exact against the reference; here: the cap really limits the steps."""
    x = torch.randn(1, 32, DIM, dtype=torch.float64) * 3
    steps = {}
    for cap in (None, 0.05):
        mem = make_memory(depth=2, chunk=4, momentum=False, decay=False, cap=cap)
        state = mem.initial_state(1, dtype=torch.float64)
        norms = []
        with torch.no_grad():
            for chunk in x.split(4, dim=1):
                _, _, new = mem.update_and_retrieve(chunk, state)
                diff = sum((new[f"w{i}"] - state[f"w{i}"]).pow(2).sum((-2, -1)) for i in range(mem.depth)).sqrt()
                norms.append(diff)
                state = new
        steps[cap] = torch.stack(norms)
    assert steps[None].max() > 0.05                      # uncapped steps are larger than the cap...
    assert steps[0.05].max() <= 0.05 + 1e-12             # ...capped ones never exceed it


def test_induction_prior_makes_each_key_the_previous_query():
    """induction_init: the key written at token t+1 equals the query at token t (same projection, one more
    token of lag), so a repeated context reads what followed it."""
    torch.manual_seed(0)
    mem = NeuralMemory(DIM, MemoryConfig(heads=2, depth=2, chunk_size=4, conv_kernel=4, induction_init=True)).double()
    x = torch.randn(1, 12, DIM, dtype=torch.float64)
    q = reference_projection(mem, mem.to_q, mem.conv_q, x, True)
    k = reference_projection(mem, mem.to_k, mem.conv_k, x, True)
    torch.testing.assert_close(k[:, :, 1:], q[:, :, :-1], atol=1e-12, rtol=0)
    assert not torch.allclose(k, q)


@pytest.mark.parametrize("anchor", [1, 4])
def test_padding_is_not_written(anchor):
    mem = make_memory(depth=2, chunk=4, anchor=anchor)
    x = torch.randn(1, 12, DIM, dtype=torch.float64)
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[:, 8:] = False
    with torch.no_grad():
        _, _, padded = mem.update_and_retrieve(x, mem.initial_state(1, dtype=torch.float64), valid)
        _, _, short = mem.update_and_retrieve(x[:, :8], mem.initial_state(1, dtype=torch.float64))
    for i in range(mem.depth):
        torch.testing.assert_close(padded[f"w{i}"], short[f"w{i}"], atol=1e-12, rtol=0)
        torch.testing.assert_close(padded[f"s{i}"], short[f"s{i}"], atol=1e-12, rtol=0)


def test_gradients_reach_projections_gates_and_initial_weights():
    mem = make_memory(depth=2, chunk=4, conv=3)
    x = torch.randn(2, 24, DIM, dtype=torch.float64)
    state = mem.initial_state(2, dtype=torch.float64)
    out1, _, state = mem.update_and_retrieve(x[:, :12], state)
    out2, _, state = mem.update_and_retrieve(x[:, 12:], state)
    # Only the later reads: their dependence on the early tokens runs through the test-time updates.
    out2.pow(2).sum().backward()
    for name in ("to_q.weight", "to_k.weight", "to_v.weight", "to_gates.weight", "to_gates.bias",
                 "initial_weights.0", "initial_weights.1", "conv_k.weight", "out_proj.weight", "output_scale"):
        grad = dict(mem.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def differentiable_reference(mem: NeuralMemory, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The naive token loop kept differentiable: every token's inner gradient by autograd with create_graph,
    so the outer loop's gradients flow through the test-time updates as written in DESIGN.md (no manual
    MLP backward, no scan). Returns the gated outputs and the final weights."""
    cfg = mem.cfg
    q, k, v, theta, eta, alpha = reference_inputs(mem, x)
    b, steps = cfg.chunk_size, x.shape[1]
    streams, finals = [], []
    for n in range(x.shape[0]):
        heads, head_finals = [], []
        for h in range(mem.heads):
            W = [w[h] for w in mem.initial_layers()]
            S = [torch.zeros_like(w) for w in W]
            reads = []
            for c0 in range(0, steps, b):
                if (c0 // b) % cfg.anchor_every == 0:
                    anchor = list(W)
                chunk = range(c0, min(c0 + b, steps))
                grads = [torch.zeros_like(w) for w in W]
                for t in chunk:
                    reads.append(memory_mlp(W, q[n, h, t]))
                    loss = (memory_mlp(anchor, k[n, h, t]) - v[n, h, t]).pow(2).sum()
                    token_grads = torch.autograd.grad(loss, anchor, create_graph=True)
                    grads = [g_sum + theta[n, t, h] / b * g for g_sum, g in zip(grads, token_grads)]
                if len(chunk) < b:
                    break
                if cfg.max_update_norm is not None:
                    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                    grads = [g * torch.clamp(cfg.max_update_norm / norm, max=1.0) for g in grads]
                eta_c, alpha_c = eta[n, list(chunk), h].mean(), alpha[n, list(chunk), h].mean()
                S = [(eta_c * s if cfg.momentum else 0.0) - g for s, g in zip(S, grads)]
                W = [((1 - alpha_c) * w if cfg.decay else w) + s for w, s in zip(W, S)]
            heads.append(torch.stack(reads))
            head_finals.append(W)
        streams.append(torch.stack(heads))
        finals.append([torch.stack(layer) for layer in zip(*head_finals)])
    return mem._output(torch.stack(streams), x), [torch.stack(layer) for layer in zip(*finals)]


@pytest.mark.parametrize("case", [dict(depth=2, chunk=3), dict(depth=2, chunk=2, anchor=3, conv=3),
                                  dict(depth=3, chunk=2, anchor=8, cap=0.3), dict(depth=2, chunk=2, anchor=4, momentum=False)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_outer_gradients_equal_differentiable_token_loop(case):
    """Every parameter's gradient through the chunked update (manual MLP backward, its hand-written second
    derivative, the anchored scan) equals autograd through the naive token loop."""
    mem = make_memory(**case)
    x = torch.randn(2, 17, DIM, dtype=torch.float64)  # 17: a pending partial chunk at the end
    out, _, state = mem.update_and_retrieve(x, mem.initial_state(2, dtype=torch.float64))
    params = list(mem.parameters())
    loss = out.pow(2).sum() + sum(state[f"w{i}"].pow(2).sum() for i in range(mem.depth))
    grads = torch.autograd.grad(loss, params)
    ref_out, ref_w = differentiable_reference(mem, x)
    ref_loss = ref_out.pow(2).sum() + sum(w.pow(2).sum() for w in ref_w)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    torch.testing.assert_close(out, ref_out, atol=1e-8, rtol=0)
    for (name, _), g, ref in zip(mem.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if ref is None else ref, atol=1e-8, rtol=1e-6, msg=name)


def test_silu_grad_first_and_second_derivatives():
    from titans_runtime.model.neural_memory import silu_grad

    grad = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 6, dtype=torch.float64, requires_grad=True) * 3
    reference = torch.autograd.grad(F.silu(z).sum(), z, create_graph=True)[0]  # silu'(z)
    torch.testing.assert_close(silu_grad(grad, z), grad * reference, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(silu_grad, (grad, z.detach().requires_grad_()))


def test_update_runs_under_no_grad_and_keeps_fp32_state_in_bf16_model():
    torch.manual_seed(0)
    mem = NeuralMemory(DIM, MemoryConfig(heads=2, depth=2, chunk_size=4)).to(torch.bfloat16)
    state = mem.initial_state(1, dtype=torch.bfloat16)
    with torch.no_grad():
        out, surprise, state = mem.update_and_retrieve(torch.randn(1, 10, DIM, dtype=torch.bfloat16), state)
    assert out.dtype == torch.bfloat16 and state["w0"].dtype == torch.float32 and state["s1"].dtype == torch.float32
    assert torch.isfinite(out.float()).all() and torch.isfinite(surprise).all()


@pytest.mark.parametrize("anchor", [1, 3])
def test_blocked_calls_with_recomputation_equal_one_pass_values_and_gradients(anchor):
    """block_tokens: a long call runs in blocks, each recomputed in backward; outputs, state and every
    parameter gradient equal the unblocked pass."""
    x = torch.randn(2, 29, DIM, dtype=torch.float64)
    results = {}
    for block in (None, 7):
        mem = make_memory(depth=2, chunk=3, conv=3, anchor=anchor)
        mem.cfg.block_tokens = block
        state = mem.initial_state(2, dtype=torch.float64)
        out, surprise, new = mem.update_and_retrieve(x, state)
        loss = out.pow(2).sum() + new["w1"].pow(2).sum() + surprise.sum()
        grads = torch.autograd.grad(loss, list(mem.parameters()))
        results[block] = (out.detach(), surprise.detach(), {k: v.detach() for k, v in new.items()}, grads)
    (out0, s0, st0, g0), (out1, s1, st1, g1) = results[None], results[7]
    torch.testing.assert_close(out1, out0, atol=1e-10, rtol=0)
    torch.testing.assert_close(s1, s0, atol=1e-10, rtol=0)
    for key in st0:
        torch.testing.assert_close(st1[key], st0[key], atol=1e-10, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_blocked_calls_refuse_higher_order_gradients():
    """A recomputed block differentiates a graph rebuilt from detached inputs: second-order gradients through
    it would be silently wrong, so asking for them is an error that names the setting to change."""
    mem = make_memory(depth=2, chunk=3, conv=3, anchor=1)
    mem.cfg.block_tokens = 7
    x = torch.randn(1, 20, DIM, dtype=torch.float64)
    out, _, _ = mem.update_and_retrieve(x, mem.initial_state(1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="block_tokens: null"):
        torch.autograd.grad(out.pow(2).sum(), list(mem.parameters()), create_graph=True)


def test_blocked_recomputation_runs_under_the_forward_autocast(monkeypatch):
    """The backward recomputes a block under the autocast its forward ran under (bf16 on a GPU in training),
    so the graph it differentiates is the one that produced the outputs."""
    mem = NeuralMemory(DIM, MemoryConfig(heads=2, depth=2, chunk_size=3, block_tokens=6))
    seen = []
    original = mem._write_read

    def recording(*args, **kwargs):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return original(*args, **kwargs)

    monkeypatch.setattr(mem, "_write_read", recording)
    x = torch.randn(1, 12, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, _ = mem.update_and_retrieve(x, mem.initial_state(1))
    out.float().pow(2).sum().backward()
    assert seen == [(False, True)] * 2 + [(True, True)] * 2  # two blocks forward, then both recomputed


def test_empty_init_reads_only_what_the_stream_wrote():
    torch.manual_seed(0)
    mem = NeuralMemory(DIM, MemoryConfig(heads=2, depth=2, chunk_size=4, empty_init=True)).double()
    x = torch.randn(1, 12, DIM, dtype=torch.float64)
    with torch.no_grad():
        out, _, _ = mem.update_and_retrieve(x, mem.initial_state(1, dtype=torch.float64))
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))  # the first chunk reads a fresh memory
    assert out[:, 4:].abs().sum() > 0                              # later chunks read what it wrote
    # The zero starting point of the last layer is fixed (not a parameter); the first layer's is learned
    # through the test-time updates.
    assert len(list(mem.initial_weights)) == 1 and "initial_last" not in mem.state_dict()
    out, _, _ = mem.update_and_retrieve(x, mem.initial_state(1, dtype=torch.float64))
    out.pow(2).sum().backward()
    assert mem.initial_weights[0].grad.abs().sum() > 0
    assert torch.equal(mem.initial_last, torch.zeros_like(mem.initial_last))


@pytest.mark.parametrize("span", [1, 7])
def test_anchored_scan_span_changes_no_value_or_gradient(span, monkeypatch):
    """A run longer than the scan span (whole spans batched, a partial one apart), with padding: values and
    every parameter gradient are the same for any span length."""
    import titans_runtime.model.neural_memory as nm

    x = torch.randn(2, 45, DIM, dtype=torch.float64)
    valid = torch.ones(2, 45, dtype=torch.bool)
    valid[1, 20:23] = False
    results = {}
    for scan_span in (nm.SCAN_SPAN, span):
        monkeypatch.setattr(nm, "SCAN_SPAN", scan_span)
        mem = make_memory(depth=2, chunk=1, conv=3, anchor=40)
        out, surprise, new = mem.update_and_retrieve(x, mem.initial_state(2, dtype=torch.float64), valid)
        loss = out.pow(2).sum() + new["w1"].pow(2).sum() + new["s0"].pow(2).sum() + surprise.sum()
        results[scan_span] = (out, new, torch.autograd.grad(loss, list(mem.parameters())))
    (out0, st0, g0), (out1, st1, g1) = results.values()
    torch.testing.assert_close(out1, out0, atol=1e-10, rtol=0)
    for key in ("w0", "w1", "s0", "s1"):
        torch.testing.assert_close(st1[key], st0[key], atol=1e-10, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
