"""Generation from a memorised stream state, and the `--memory off` reset."""
from __future__ import annotations

import pytest
import torch

from titans_runtime.config import TitansConfig
from titans_runtime.errors import InputError
from titans_runtime.generate import generate, sample_next
from titans_runtime.model.state import StreamState, cat_batch
from titans_runtime.model.titans import TitanModel
from titans_runtime.runtime.memory_reset import reset_long_term_memory

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run many small ops: one thread is faster and does not fight the other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(variant: str = "mac", seed: int = 0, **overrides) -> TitanModel:
    cfg = TitansConfig(variant=variant, dtype="float64").replace(**{
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.vocab_size": VOCAB, "attention.window": 8, "attention.segment_len": 8,
        "memory.heads": 2, "memory.chunk_size": 4, "memory.conv_kernel": 3, "memory.layers": None,
        "persistent.n_tokens": 2, "persistent.n_tasks": 2, **overrides,
    })
    torch.manual_seed(seed)
    model = TitanModel(cfg).eval()
    with torch.no_grad():  # data-dependent gates and a visible memory output, so memory changes logits
        for mem in model.memory.memories.values():
            mem.to_gates.weight.normal_(0.0, 0.2)
            mem.out_gate.weight.normal_(0.0, 0.2)
    return model


def stream_ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def memorised_state(model: TitanModel, n: int = 40, seed: int = 1) -> StreamState:
    with torch.no_grad():
        return model(torch.tensor([stream_ids(n, seed)]), task_ids=1).state


def assert_states_close(a: StreamState, b: StreamState) -> None:
    assert a.position == b.position
    fa, fb = a.to_flat(), b.to_flat()
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fa[key].shape == fb[key].shape, key
        torch.testing.assert_close(fa[key], fb[key], rtol=1e-9, atol=1e-11, msg=key)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_greedy_is_the_argmax_of_the_models_own_logits_and_the_state_continues_the_stream(variant):
    model = tiny_model(variant)
    state = memorised_state(model)  # position 40: mid MAC segment, mid memory chunk after the prompt
    prompt = stream_ids(5, seed=2)
    ids, after = generate(model, state, prompt, n_tokens=12, temperature=0.0, task_id=1)
    assert len(ids) == 12
    # One call over prompt + generated text from the same state: token i was the argmax after prefix i.
    with torch.no_grad():
        whole = model(torch.tensor([prompt + ids]), task_ids=1, state=state)
    argmax = whole.logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert ids == argmax
    assert_states_close(after, whole.state)
    assert after.position == 40 + len(prompt) + 12


def test_sampling_is_deterministic_for_a_seed():
    model = tiny_model("mag")
    state = memorised_state(model)
    prompt = stream_ids(4, seed=3)
    a, state_a = generate(model, state, prompt, 16, temperature=1.0, top_k=None, seed=7, task_id=1)
    b, state_b = generate(model, state, prompt, 16, temperature=1.0, top_k=None, seed=7, task_id=1)
    c, _ = generate(model, state, prompt, 16, temperature=1.0, top_k=None, seed=8, task_id=1)
    assert a == b and a != c
    assert_states_close(state_a, state_b)
    greedy, _ = generate(model, state, prompt, 16, temperature=0.0, task_id=1)
    top1, _ = generate(model, state, prompt, 16, temperature=1.3, top_k=1, seed=5, task_id=1)
    assert top1 == greedy


def test_sample_next_respects_top_k_and_temperature():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 2, gen) for _ in range(200)}
    assert draws == {1, 2}  # only the two largest logits can be drawn
    assert sample_next(logits, 0.0, None, gen) == 1
    cold = [sample_next(logits, 1e-4, None, gen) for _ in range(50)]
    assert set(cold) == {1}  # a near-zero temperature is greedy
    hot = {sample_next(logits, 100.0, None, gen) for _ in range(400)}
    assert hot == {0, 1, 2, 3, 4}


def test_memory_matters_for_generation():
    """The same prompt continued from a memorised stream and from that stream with its long-term memory
    reset (attention caches kept) gives different logits and text."""
    model = tiny_model("mac")
    with torch.no_grad():  # a louder memory output, so that the sampled text differs as well
        for mem in model.memory.memories.values():
            mem.output_scale.fill_(10.0)
    state = memorised_state(model, n=64)
    forgotten = reset_long_term_memory(model, state)
    prompt = stream_ids(8, seed=4)  # a whole MAC segment: the attention cache is the same (empty) in both
    with torch.no_grad():
        with_memory = model(torch.tensor([prompt]), task_ids=1, state=state).logits
        without = model(torch.tensor([prompt]), task_ids=1, state=forgotten).logits
    assert (with_memory - without).abs().max() > 1e-3
    a, _ = generate(model, state, prompt, 20, temperature=1.0, seed=3, task_id=1)
    b, _ = generate(model, forgotten, prompt, 20, temperature=1.0, seed=3, task_id=1)
    assert a != b


def test_reset_gives_the_fresh_memory_and_keeps_the_core():
    model = tiny_model("mac")
    state = memorised_state(model, n=42)  # 42: a pending partial chunk and a held MAC segment snapshot
    reset = reset_long_term_memory(model, state)
    fresh = model.initial_state(1)
    assert reset.position == state.position
    assert reset.core.keys() == state.core.keys()
    assert all(reset.core[k] is state.core[k] for k in state.core)
    for layer, mem in reset.memory.items():
        assert mem.keys() == state.memory[layer].keys()
        assert int(mem["seen"]) == 42  # MAC finds its segment starts through it
        for key, value in fresh.memory[layer].items():
            if key != "seen":
                assert torch.equal(mem[key], value), key
        assert state.memory[layer]["pending_k"].shape[2] == 2 and mem["pending_k"].shape[2] == 0
        for i in range(model.memory.memories[layer].depth):
            assert torch.equal(mem[f"segment_w{i}"], fresh.memory[layer][f"w{i}"])
            assert not torch.equal(state.memory[layer][f"w{i}"], fresh.memory[layer][f"w{i}"])
    batched = cat_batch([state, memorised_state(model, n=42, seed=9)])
    assert reset_long_term_memory(model, batched).memory["0"]["w0"].shape[0] == 2


def test_reset_inside_a_mac_segment_keeps_the_segment_starts():
    """Reset at 36 (attention segments of 8): tokens 40..47 must read the weights held at 40, which
    include the chunk 36..39 written after the reset, not the weights right after the reset."""
    model = tiny_model("mac")
    state = reset_long_term_memory(model, memorised_state(model, n=36))
    with torch.no_grad():
        at_40 = model(torch.tensor([stream_ids(4, seed=11)]), state=state).state
        at_48 = model(torch.tensor([stream_ids(8, seed=12)]), state=at_40).state
    for layer, mem in at_48.memory.items():
        assert torch.equal(mem["segment_w0"], at_40.memory[layer]["w0"])
        assert not torch.equal(at_40.memory[layer]["w0"], state.memory[layer]["w0"])


@pytest.mark.parametrize("variant,segment", [("mac", 8), ("mac", 12), ("mag", 8), ("mal", 8)])
def test_memory_off_forgets_everything_beyond_the_attention_window(variant, segment):
    """Two streams that differ only in their first segment: with the memory reset at every segment, the
    4th segment's logits are identical; with the memory on they differ."""
    model = tiny_model(variant)
    a = stream_ids(4 * segment, seed=5)
    b = stream_ids(segment, seed=6) + a[segment:]

    def last_logits(ids: list[int], memory_off: bool) -> torch.Tensor:
        state = model.initial_state(1)
        with torch.no_grad():
            for start in range(0, len(ids), segment):
                if memory_off:
                    state = reset_long_term_memory(model, state)
                out = model(torch.tensor([ids[start:start + segment]]), task_ids=0, state=state)
                state = out.state
        return out.logits

    assert torch.equal(last_logits(a, True), last_logits(b, True))
    assert (last_logits(a, False) - last_logits(b, False)).abs().max() > 1e-6


def test_generate_without_a_state_starts_a_fresh_stream():
    model = tiny_model("mal")
    prompt = stream_ids(6, seed=8)
    ids, state = generate(model, None, prompt, 5, temperature=0.0)
    ids2, state2 = generate(model, model.initial_state(1), prompt, 5, temperature=0.0)
    assert ids == ids2 and state.position == 11
    assert_states_close(state, state2)
    none, after_prompt = generate(model, None, prompt, 0)
    assert none == [] and after_prompt.position == 6


def test_bad_generation_arguments_are_input_errors():
    model = tiny_model("mac")
    state = model.initial_state(1)
    cases = [
        (dict(prompt_ids=[]), "prompt of at least one token"),
        (dict(prompt_ids=[VOCAB]), "outside the vocabulary"),
        (dict(n_tokens=-1), "integer >= 0"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top-k"),
        (dict(task_id=2), "unknown task id 2"),
        (dict(state=cat_batch([state, state])), "one stream"),
    ]
    for override, message in cases:
        args = dict(state=state, prompt_ids=[1, 2], n_tokens=2) | override
        with pytest.raises(InputError, match=message) as err:
            generate(model, **args)
        assert "\n" not in str(err.value)
