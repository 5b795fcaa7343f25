"""LLaMA -> Titans conversion: a tiny LLaMA built and saved by transformers itself converts to a TitanModel
whose logits equal transformers' (memory closed), from the Hugging Face layout (single file, sharded, .bin,
bf16, tied embeddings) and the Meta layout (2 model-parallel shards); then the memory really opens."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from titans_runtime import TitanModel, create_titan_model
from titans_runtime.errors import InputError
from titans_runtime.model.checkpoint import load_model
from titans_runtime.model.convert import convert_to_folder, read_checkpoint
from titans_runtime.model.tokenizer import load_tokenizer

DATA = Path(__file__).parents[2] / "shared" / "data"
ROOT = Path(__file__).parents[1]
STEPS = 64
VOCAB = 32000  # the llama2 sentencepiece tokenizer's
# Llama 3.1 rope scaling (Meta's fixed values, so params.json can say it too). With theta 5e5 and head dim 16
# the pair frequencies fall in all three bands: unchanged, smoothed and divided by the factor.
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(threads)


def llama_config(**kw) -> transformers.LlamaConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                rope_theta=500000.0, rope_scaling=dict(ROPE), rms_norm_eps=1e-5, tie_word_embeddings=False,
                initializer_range=0.2)  # weights big enough that the rotary details move the logits
    base.update(kw)
    return transformers.LlamaConfig(**base)


def bf16_rounded(model: transformers.LlamaForCausalLM) -> transformers.LlamaForCausalLM:
    """The same LLaMA with bf16-rounded weights, run in fp32 (model.to(bf16) would round its rotary too)."""
    rounded = transformers.LlamaForCausalLM(model.config).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    return rounded


def hf_logits(model: transformers.LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def titan_logits(model: TitanModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def convert(path: Path, variant: str = "mac", **overrides) -> TitanModel:
    overrides.setdefault("memory.layers", [0, 1])
    overrides.setdefault("dtype", "float32")
    return create_titan_model(path, max_seq_len=STEPS, variant=variant, **overrides)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, STEPS), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> tuple[transformers.LlamaForCausalLM, Path, Path]:
    """A random tiny LLaMA (GQA, llama3 rope scaling) saved by transformers: one file, and sharded."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    single, sharded = tmp_path_factory.mktemp("hf_single"), tmp_path_factory.mktemp("hf_sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="60KB")
    return model, single, sharded


# ------------------------------------------------------------------------------------ Hugging Face layout
@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_logits_equal_transformers(hf, ids, variant, layout):
    model, single, sharded = hf
    folder = single if layout == "single" else sharded
    if layout == "sharded":
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    titan = convert(folder, variant)
    assert titan.config.memory_layers == [0, 1]
    torch.testing.assert_close(titan_logits(titan, ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_converted_config_and_fresh_parts(hf):
    titan = convert(hf[1])
    cfg = titan.config
    assert (cfg.model.n_kv_heads, cfg.model.ffn_hidden_dim, cfg.model.rope_theta) == (2, 224, 500000.0)
    assert cfg.model.rope_scaling == ROPE
    assert (cfg.attention.window, cfg.attention.segment_len) == (STEPS, STEPS)
    assert cfg.memory.output_gate_init == 0.0 and cfg.memory.extra_attention_init == 0.0
    for mem in titan.memory.memories.values():
        assert torch.equal(mem.output_scale, torch.zeros_like(mem.output_scale))
    for layer in titan.core.layers:
        assert torch.equal(layer.attention.extra_gate, torch.zeros(4))
    for name, tensor in list(titan.named_parameters()) + list(titan.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    # The recomputed rotary buffer is the one TitanModel itself builds.
    torch.testing.assert_close(titan.core.rotary.inv_freq, TitanModel(cfg).core.rotary.inv_freq, atol=0, rtol=0)
    # The default memory for a converted model: every 4th layer counting back from the last.
    assert create_titan_model(hf[1], max_seq_len=STEPS).config.memory_layers == [1]


def test_rope_scaling_and_unpermute_matter(hf, ids, tmp_path):
    """Controls: the comparison above would fail without the llama3 scaling or with q/k left permuted."""
    model, single, _ = hf
    plain = tmp_path / "plain"
    shutil.copytree(single, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    cfg.pop("rope_scaling", None)
    (plain / "config.json").write_text(json.dumps(cfg))
    assert (titan_logits(convert(plain), ids) - hf_logits(model, ids)).abs().max() > 1e-3
    titan = convert(single)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            titan.core.layers[i].attention.wq.weight.copy_(layer.self_attn.q_proj.weight)
    assert (titan_logits(titan, ids) - hf_logits(model, ids)).abs().max() > 1e-3


def test_transformers_4_config_json(hf, ids, tmp_path):
    """transformers 4.x writes rope_theta / rope_scaling / torch_dtype where 5.x writes rope_parameters / dtype."""
    model, single, _ = hf
    shutil.copytree(single, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_checkpoint(tmp_path).backbone.rope_scaling == ROPE
    torch.testing.assert_close(titan_logits(convert(tmp_path), ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_hf_bf16_weights(hf, ids, tmp_path):
    half = transformers.LlamaForCausalLM(hf[0].config)
    half.load_state_dict(hf[0].state_dict())
    half.to(torch.bfloat16).save_pretrained(tmp_path)
    reference = bf16_rounded(hf[0])
    assert read_checkpoint(tmp_path).dtype == "bfloat16"
    titan = create_titan_model(tmp_path, max_seq_len=STEPS)
    assert titan.dtype == torch.bfloat16 and titan.config.dtype == "bfloat16"
    torch.testing.assert_close(titan_logits(convert(tmp_path), ids), hf_logits(reference, ids), atol=1e-4, rtol=0)


def test_hf_tied_embeddings(ids, tmp_path):
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    titan = convert(tmp_path, "mag")
    out, emb = titan.persistent.output.weight, titan.core.tok_embeddings.weight
    assert torch.equal(out, emb) and out.data_ptr() != emb.data_ptr()  # our head is a copy
    torch.testing.assert_close(titan_logits(titan, ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_hf_pytorch_bin_fallback(hf, ids, tmp_path):
    model, single, _ = hf
    shutil.copy(single / "config.json", tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(titan_logits(convert(tmp_path, "mal"), ids), hf_logits(model, ids), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- Meta layout
def write_meta(titan: TitanModel, folder: Path, vocab_parallel_embedding: bool) -> None:
    """Our converted weights (Meta's names) as two model-parallel shards + params.json (vocab_size -1)."""
    split = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
    state = {k.removeprefix("core."): v for k, v in titan.state_dict().items() if k.startswith("core.")}
    state["norm.weight"] = titan.persistent.norm.weight
    state["output.weight"] = titan.persistent.output.weight
    shards: list[dict] = [{}, {}]
    for key, value in state.items():
        if key.endswith("extra_gate"):
            continue
        kind = key.split(".")[-2]
        axis = split.get(kind, 0 if key == "output.weight" else None)
        if key == "tok_embeddings.weight":
            axis = 0 if vocab_parallel_embedding else 1
        parts = [value, value] if axis is None else value.chunk(2, dim=axis)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone().to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (folder / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_meta_two_shards_equal_transformers(hf, ids, tmp_path, vocab_parallel):
    model, single, _ = hf
    half = bf16_rounded(model)  # the shards are bf16, as Meta ships them
    write_meta(convert(single), tmp_path / "meta", vocab_parallel)
    source = read_checkpoint(tmp_path / "meta")
    assert source.layout == "meta" and source.backbone.vocab_size == VOCAB and source.dtype == "bfloat16"
    assert source.backbone.hidden_dim == 224 and source.backbone.rope_scaling == ROPE
    for variant in ("mac", "mag", "mal"):
        titan = convert(tmp_path / "meta", variant)
        torch.testing.assert_close(titan_logits(titan, ids), hf_logits(half, ids), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------- folders and the CLI
def load_cli():
    spec = importlib.util.spec_from_file_location("convert_llama", ROOT / "tools" / "convert_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_a_folder_that_loads(hf, ids, tmp_path, capsys, monkeypatch):
    model, single, _ = hf
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(single, checkpoint)
    shutil.copy(DATA / "tokenizers" / "llama2_tokenizer.model", checkpoint / "tokenizer.model")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # relative paths, as typed on a command line
    rc = load_cli().main(["--checkpoint", "ckpt", "--out", "out", "--variant", "mag",
                          "--max-seq-len", str(STEPS), "--set", "memory.layers=[0, 1]", "--dtype", "float32"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    assert (out / "tokenizer.model").is_file()
    loaded = load_model(out)
    assert loaded.config.tokenizer == "tokenizer.model" and loaded.config.variant == "mag"
    assert load_tokenizer(loaded.config.tokenizer, out).vocab_size == 32000
    reference = hf_logits(model, ids)
    torch.testing.assert_close(titan_logits(loaded, ids), reference, atol=1e-4, rtol=0)
    again = create_titan_model(out)  # our own folder loads through the same entry point (lazily)
    expected = loaded.state_dict()
    assert again.state_dict().keys() == expected.keys()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    torch.testing.assert_close(titan_logits(again, ids), reference, atol=1e-4, rtol=0)
    assert create_titan_model(out, variant="mal").config.variant == "mal"
    again = convert_to_folder(out, tmp_path / "out_mal", variant="mal")  # re-save our folder as another variant
    assert (again / "tokenizer.model").is_file() and load_model(again).config.variant == "mal"
    one_line_error(out, "has its own config.yaml", config=ROOT / "configs" / "tiny.yaml")


def test_tokenizer_bigger_than_the_vocabulary(tmp_path):
    torch.manual_seed(4)
    transformers.LlamaForCausalLM(llama_config(vocab_size=300)).save_pretrained(tmp_path)
    shutil.copy(DATA / "tokenizers" / "llama2_tokenizer.model", tmp_path / "tokenizer.model")
    one_line_error(tmp_path, "the tokenizer has 32000 tokens, more than the model's vocabulary of 300")


def test_cli_error_is_one_line(tmp_path, capsys):
    assert load_cli().main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found") and err.count("\n") == 1


# ---------------------------------------------------------------------------------- the memory opens up
@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_memory_opens_and_trains(hf, ids, variant):
    model, single, _ = hf
    reference = hf_logits(model, ids)
    titan = convert(single, variant)
    for p in titan.core.parameters():
        p.requires_grad_(False)
    for layer in titan.core.layers:
        layer.attention.extra_gate.requires_grad_(True)
    for p in titan.persistent.parameters():
        p.requires_grad_(False)
    titan.persistent.banks.requires_grad_(True)
    gates = [m.output_scale for m in titan.memory.memories.values()] + [l.attention.extra_gate for l in titan.core.layers]

    out = titan(ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for gate in gates:  # gradient reaches both closed gates at exactly 0
        assert gate.grad is not None and gate.grad.abs().sum() > 0
    opt = torch.optim.Adam([p for p in titan.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(titan(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(g.abs().sum() > 0 for g in gates)
    assert (titan_logits(titan, ids) - reference).abs().max() > 1e-3


def test_open_gates_change_outputs(hf, ids):
    model, single, _ = hf
    titan = convert(single, "mac")
    closed = titan_logits(titan, ids)
    with torch.no_grad():
        for mem in titan.memory.memories.values():
            mem.output_scale.fill_(1.0)
    memory_open = titan_logits(titan, ids)
    assert (memory_open - closed).abs().max() > 1e-3
    with torch.no_grad():
        for layer in titan.core.layers:
            layer.attention.extra_gate.fill_(1.0)
    assert (titan_logits(titan, ids) - memory_open).abs().max() > 1e-3
    assert titan(ids).knowledge.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ errors
def one_line_error(path, match: str, **kw) -> str:
    with pytest.raises(InputError, match=match) as info:
        create_titan_model(path, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_config_files(tmp_path):
    one_line_error(tmp_path, "no params.json .* or config.json")
    one_line_error(tmp_path / "nowhere", "checkpoint not found")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64}))
    one_line_error(tmp_path, "no consolidated")


def test_unsupported_architectures(hf, tmp_path):
    for model_type, arch in (("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")):
        folder = tmp_path / model_type
        shutil.copytree(hf[1], folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type=model_type, architectures=[arch])
        (folder / "config.json").write_text(json.dumps(cfg))
        assert "config.json" in one_line_error(folder, f"unsupported architecture '{model_type}'")
    cfg = json.loads((hf[1] / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    folder = tmp_path / "yarn"
    shutil.copytree(hf[1], folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(folder, "unsupported rope scaling 'yarn'")


def test_hf_missing_weights_and_bad_shapes(hf, tmp_path):
    shutil.copy(hf[1] / "config.json", tmp_path / "config.json")
    one_line_error(tmp_path, "no model.safetensors or pytorch_model.bin")
    cfg = json.loads((hf[1] / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(hf[1] / "model.safetensors", tmp_path / "model.safetensors")
    msg = one_line_error(tmp_path, "does not match config.json")
    assert "model.safetensors" in msg and "mlp" in msg
    state = load_file(str(hf[1] / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf[1] / "config.json").read_text())
    one_line_error(tmp_path, "no weight for 'core.layers.1.attention.wk.weight'")


def test_meta_shapes_not_matching_params(hf, tmp_path):
    write_meta(convert(hf[1]), tmp_path, vocab_parallel_embedding=False)
    params = json.loads((tmp_path / "params.json").read_text())
    params["multiple_of"] = 256  # implies a hidden size of 256, not 224
    (tmp_path / "params.json").write_text(json.dumps(params))
    msg = one_line_error(tmp_path, "does not match params.json")
    assert "consolidated.00.pth" in msg
    params.update(multiple_of=32, moe_args={"num_experts": 8})
    (tmp_path / "params.json").write_text(json.dumps(params))
    one_line_error(tmp_path, "unsupported parameter 'moe_args'")


def test_load_model_shape_mismatch_is_one_line(hf, tmp_path):
    out = convert_to_folder(hf[1], tmp_path / "out", max_seq_len=STEPS)
    cfg_text = (out / "config.yaml").read_text().replace("n_kv_heads: 2", "n_kv_heads: 4")
    (out / "config.yaml").write_text(cfg_text)
    with pytest.raises(InputError, match="has shape") as info:
        load_model(out)
    assert "\n" not in str(info.value)
    one_line_error(out, "does not match config.yaml")
    (out / "config.yaml").write_text(cfg_text.replace("n_kv_heads: 4", "n_kv_heads: 2").replace("n_tokens: 4", "n_tokens: 0"))
    one_line_error(out, "persistent.banks")


def test_base_config_and_odd_max_seq_len(hf, ids):
    model, single, _ = hf
    titan = create_titan_model(single, max_seq_len=40, config=ROOT / "configs" / "llama-7b-mag.yaml",
                               **{"memory.layers": [1], "dtype": "float32"})
    cfg = titan.config
    assert (cfg.variant, cfg.memory.dim, cfg.persistent.n_tokens, cfg.model.dim) == ("mag", 1024, 16, 64)
    assert (cfg.attention.window, cfg.attention.segment_len) == (40, 64)  # MAC-style segment: chunk multiple
    assert cfg.memory.output_gate_init == 0.0 and cfg.memory.extra_attention_init == 0.0
    torch.testing.assert_close(titan_logits(titan, ids[:, :40]), hf_logits(model, ids[:, :40]), atol=1e-4, rtol=0)
    mac = convert(single, "mac", **{"memory.chunk_size": 16})
    odd = create_titan_model(single, max_seq_len=40, variant="mac", **{"memory.layers": [0, 1], "dtype": "float32"})
    assert (odd.config.attention.window, odd.config.attention.segment_len) == (40, 48)
    torch.testing.assert_close(titan_logits(odd, ids[:, :40]), titan_logits(mac, ids[:, :40]), atol=1e-5, rtol=0)


def test_closed_gates_exact_when_extra_tokens_dominate(ids, tmp_path):
    """Large weights: the closed extra tokens would take most of the softmax; closing must stay exact."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(initializer_range=0.4)).eval()
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(titan_logits(convert(tmp_path, "mag"), ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_weights_read_in_row_blocks(hf, ids, tmp_path, monkeypatch):
    """Large weights are copied in blocks of rows (here: tiny blocks, so every weight takes many)."""
    from titans_runtime.model import convert as convert_module

    model, single, sharded = hf
    monkeypatch.setattr(convert_module, "READ_BLOCK_BYTES", 4096)
    shutil.copy(single / "config.json", tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    write_meta(convert(single), tmp_path / "meta", vocab_parallel_embedding=False)
    for folder in (sharded, tmp_path):
        torch.testing.assert_close(titan_logits(convert(folder), ids), hf_logits(model, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(titan_logits(convert(tmp_path / "meta"), ids), hf_logits(bf16_rounded(model), ids),
                               atol=1e-4, rtol=0)


def test_find_tokenizer_prefers_a_usable_file(tmp_path):
    from titans_runtime.model.convert import find_tokenizer

    meta, parent = tmp_path / "llama" / "7B", tmp_path / "llama"
    meta.mkdir(parents=True)
    assert find_tokenizer(meta, parent) is None
    shutil.copy(DATA / "tokenizers" / "llama2_tokenizer.model", parent / "tokenizer.model")
    assert find_tokenizer(meta, parent) == (parent / "tokenizer.model").resolve()  # Meta's LLaMA 2 layout
    (meta / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken (Meta's Llama 3)
    assert find_tokenizer(meta, parent) == (meta / "tokenizer.model").resolve()
    (meta / "tokenizer.json").write_text("{}")
    assert find_tokenizer(meta, parent) == (meta / "tokenizer.json").resolve()
    shutil.copy(DATA / "tokenizers" / "llama2_tokenizer.model", meta / "tokenizer.model")
    assert find_tokenizer(meta, parent) == (meta / "tokenizer.model").resolve()
