"""TitanModel: streaming == one call, saved state resumes exactly, backbone == plain LLaMA, gradients, no NaN."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from titans_runtime import StreamState, TitanModel, TitansConfig
from titans_runtime.model.state import cat_batch, split_batch

VARIANTS = ["mac", "mag", "mal", "lmm"]


def small_config(variant: str = "mac", **overrides) -> TitansConfig:
    cfg = TitansConfig(variant=variant, dtype="float64").replace(**{
        "model.dim": 32, "model.n_layers": 3, "model.n_heads": 4, "model.n_kv_heads": 2, "model.vocab_size": 50,
        "attention.window": 8, "attention.segment_len": 8,
        "memory.heads": 2, "memory.chunk_size": 4, "memory.conv_kernel": 3, "memory.layers": None,
        "persistent.n_tokens": 3, "persistent.n_tasks": 2,
    })
    return cfg.replace(**overrides) if overrides else cfg


def make_model(cfg: TitansConfig, seed: int = 0) -> TitanModel:
    torch.manual_seed(seed)
    model = TitanModel(cfg).eval()
    with torch.no_grad():  # data-dependent memory gates, so the gates' code paths are exercised
        for mem in model.memory.memories.values():
            mem.to_gates.weight.normal_(0.0, 0.2)
    return model


def run_in_pieces(model: TitanModel, ids: torch.Tensor, splits: list[int], state: StreamState | None = None,
                  task_ids=None):
    outs, start = [], 0
    for n in splits:
        out = model(ids[:, start:start + n], task_ids=task_ids, state=state)
        outs.append(out)
        state = out.state
        start += n
    return outs, state


def assert_states_equal(a: StreamState, b: StreamState, atol: float = 1e-10) -> None:
    assert a.position == b.position
    fa, fb = a.to_flat(), b.to_flat()
    assert fa.keys() == fb.keys()
    for key in fa:
        torch.testing.assert_close(fa[key], fb[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("variant", VARIANTS)
def test_segments_with_carried_state_equal_one_call(variant):
    model = make_model(small_config(variant))
    ids = torch.randint(0, 50, (2, 37))
    tasks = torch.tensor([0, 1])
    with torch.no_grad():
        whole = model(ids, task_ids=tasks)
        outs, state = run_in_pieces(model, ids, [5, 3, 8, 11, 1, 9], task_ids=tasks)
    torch.testing.assert_close(torch.cat([o.logits for o in outs], 1), whole.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cat([o.surprise for o in outs], 1), whole.surprise, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.cat([o.knowledge for o in outs], 1), whole.knowledge, atol=1e-10, rtol=0)
    assert_states_equal(state, whole.state)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_state_continues_identically(variant, tmp_path):
    model = make_model(small_config(variant))
    ids = torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        first = model(ids[:, :13])
        first.state.save(tmp_path / "state.safetensors", meta={"stream": "a"})
        expected = model(ids[:, 13:], state=first.state)
        loaded = StreamState.load(tmp_path / "state.safetensors")
        resumed = model(ids[:, 13:], state=loaded)
    assert StreamState.read_meta(tmp_path / "state.safetensors") == {"stream": "a"}
    torch.testing.assert_close(resumed.logits, expected.logits, atol=0, rtol=0)
    assert_states_equal(resumed.state, expected.state, atol=0)


def test_batched_streams_equal_streams_alone():
    model = make_model(small_config("mac"))
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        both = model(ids, task_ids=torch.tensor([1, 0]))
        alone = [model(ids[i:i + 1], task_ids=t) for i, t in enumerate([1, 0])]
    for i in range(2):
        torch.testing.assert_close(both.logits[i:i + 1], alone[i].logits, atol=1e-10, rtol=0)
        assert_states_equal(split_batch(both.state)[i], alone[i].state)
    assert_states_equal(cat_batch([a.state for a in alone]), both.state)


def test_padding_at_the_end_matches_the_unpadded_stream():
    model = make_model(small_config("mag"))
    ids = torch.randint(0, 50, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        short = model(ids[1:, :11])
    torch.testing.assert_close(padded.logits[1:, :11], short.logits, atol=1e-10, rtol=0)



@pytest.mark.parametrize("variant", ["mag", "mal"])
def test_sliding_window_in_query_blocks_equals_one_block(variant, monkeypatch):
    """A call longer than WINDOW_BLOCKS windows attends in query blocks: same outputs and gradients as
    one block over every key (with persistent tokens, a cache from an earlier call, and padding)."""
    import titans_runtime.model.core as core

    model = make_model(small_config(variant))
    ids = torch.randint(0, 50, (2, 70))
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, 47:] = 0
    results = []
    for blocks in (core.WINDOW_BLOCKS, 1000):
        monkeypatch.setattr(core, "WINDOW_BLOCKS", blocks)
        model.zero_grad()
        first = model(ids[:, :10])
        out = model(ids[:, 10:], attention_mask=mask, state=first.state)
        (out.logits * mask[..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), out.knowledge.detach(), grads))
    (logits, knowledge, grads), (ref_logits, ref_knowledge, ref_grads) = results
    torch.testing.assert_close(logits[0], ref_logits[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(logits[1, :47], ref_logits[1, :47], atol=1e-10, rtol=0)
    torch.testing.assert_close(knowledge, ref_knowledge, atol=1e-10, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-9, rtol=1e-9, msg=name)

# ------------------------------------------------------------------------------------------ plain LLaMA
def reference_llama(model: TitanModel, ids: torch.Tensor) -> torch.Tensor:
    """Meta's llama/model.py forward, written independently: complex rotary, full causal attention."""
    cfg = model.config.model
    core, head = model.core, model.persistent
    hd = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.outer(torch.arange(ids.shape[1], dtype=torch.float64), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)

    def rotate(x):  # (B, T, H, hd)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(xc * rot[None, :, None, :]).flatten(3)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    h = core.tok_embeddings.weight[ids]
    steps = ids.shape[1]
    causal = torch.full((steps, steps), float("-inf"), dtype=h.dtype).triu(1)
    for layer in core.layers:
        a = layer.attention
        x = rms(h, layer.attention_norm.weight)
        q = rotate((x @ a.wq.weight.T).unflatten(-1, (cfg.n_heads, hd)))
        k = rotate((x @ a.wk.weight.T).unflatten(-1, (cfg.kv_heads, hd)))
        v = (x @ a.wv.weight.T).unflatten(-1, (cfg.kv_heads, hd))
        rep = cfg.n_heads // cfg.kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + causal
        att = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).flatten(2)
        h = h + att @ a.wo.weight.T
        x = rms(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    return rms(h, head.norm.weight) @ head.output.weight.T


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_backbone_without_memory_equals_plain_llama(variant):
    cfg = small_config(variant, **{"memory.enabled": False, "persistent.n_tokens": 0,
                                   "attention.window": 64, "attention.segment_len": 64})
    model = make_model(cfg)
    ids = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_llama(model, ids), atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_closed_gates_reproduce_plain_llama_and_open_under_training(variant):
    cfg = small_config(variant, **{"memory.output_gate_init": 0.0, "memory.extra_attention_init": 0.0,
                                   "attention.window": 64, "attention.segment_len": 64})
    model = make_model(cfg)
    ids = torch.randint(0, 50, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_llama(model, ids), atol=1e-10, rtol=0)
    model.train()
    out = model(ids)
    F.cross_entropy(out.logits[0, :-1], ids[0, 1:]).backward()
    gate_grads = [layer.attention.extra_gate.grad.abs().sum() for layer in model.core.layers]
    scale_grads = [m.output_scale.grad.abs().sum() for m in model.memory.memories.values()]
    assert all(g > 0 for g in gate_grads) and all(g > 0 for g in scale_grads)


def test_window_limits_attention():
    """MAG with a window of 8: logits at position t do not depend on tokens before t - 7 except via memory."""
    cfg = small_config("mag", **{"memory.enabled": False, "persistent.n_tokens": 0})
    model = make_model(cfg)
    ids = torch.randint(0, 50, (1, 30))
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, 3 + 8 * cfg.model.n_layers:], b[:, 3 + 8 * cfg.model.n_layers:], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:, 3:11], b[:, 3:11])


# ----------------------------------------------------------------------------------- memory behaviour
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_flow_through_test_time_updates(variant):
    model = make_model(small_config(variant))
    model.train()
    ids = torch.randint(0, 50, (1, 24))
    first = model(ids[:, :12])
    second = model(ids[:, 12:], state=first.state)  # reads memory written by the first segment
    F.cross_entropy(second.logits[0, :-1], ids[0, 13:]).backward()
    params = dict(model.named_parameters())
    layer = next(iter(model.memory.memories))
    for name in ("to_q.weight", "to_k.weight", "to_v.weight", "to_gates.weight", "initial_weights.0",
                 "initial_weights.1", "conv_v.weight", "output_scale"):
        grad = params[f"memory.memories.{layer}.{name}"].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_knowledge_attention_is_mass_on_persistent_tokens(variant):
    model = make_model(small_config(variant))
    ids = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        open_ = model(ids).knowledge
        for layer in model.core.layers:
            layer.attention.extra_gate.fill_(0.5)
        half = model(ids).knowledge
        for layer in model.core.layers:
            layer.attention.extra_gate.zero_()
        closed = model(ids).knowledge
    assert ((open_ > 0) & (open_ < 1)).all()
    assert (half < open_).all()
    assert closed.abs().max() == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_nan_over_10k_random_tokens(variant):
    cfg = TitansConfig(variant=variant)  # the tiny default config: default gates
    torch.manual_seed(0)
    model = TitanModel(cfg).eval()
    state = None
    with torch.no_grad():
        for _ in range(10):
            out = model(torch.randint(0, cfg.model.vocab_size, (1, 1000)), state=state)
            state = out.state
            assert torch.isfinite(out.logits).all() and torch.isfinite(out.surprise).all()
    assert state.position == 10_000
    assert all(torch.isfinite(t).all() for t in state.to_flat().values())


def test_unknown_task_id_is_a_clear_error():
    from titans_runtime.errors import InputError

    model = make_model(small_config("mac"))
    with pytest.raises(InputError, match="unknown task id 5"):
        model(torch.zeros(1, 4, dtype=torch.long), task_ids=5)


def test_moving_the_model_drops_cached_persistent_keys_values():
    """Persistent K/V are cached per task under no_grad; .to(dtype / device) must not reuse the old ones
    (a model run on CPU then moved to CUDA failed on the cached CPU tensors)."""
    model = make_model(small_config("mag"))
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        model(ids)                        # fills the cache in float64
        moved = model(ids).logits         # cached
        model.float()
        assert model.core._persistent_cache == {}
        out = model(ids).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), moved, atol=1e-4, rtol=1e-4)
