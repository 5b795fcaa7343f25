"""Peak host memory of LLaMA -> Titans conversion vs the checkpoint's size on disk.

Writes a random checkpoint shaped like Llama 3.2 1B (dim 2048, 16 layers, 32/8 heads, ffn 8192, vocab 128256,
bf16) in the Hugging Face layout (one model.safetensors, tied embeddings) and in Meta's layout (params.json +
2 model-parallel consolidated.NN.pth shards), then runs each conversion in a fresh child process and reports
that child's peak RSS (ru_maxrss) beside the file sizes, the size of the converted model's weights, and the
peak of a child that only imports the package (the fixed cost of torch & co).

    python tools/measure_convert_memory.py                    # ~1.2B parameters, ~2.5 GB per layout on disk
    python tools/measure_convert_memory.py --shape small      # a quick run of the same steps

Not a test (it takes minutes); the numbers go in the conversion notes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5, multiple_of=256, hidden=8192),
    "small": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=32000, ffn_dim_multiplier=1.5, multiple_of=256, hidden=2048),
}


def meta_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    head = s["dim"] // s["n_heads"]
    shapes = {"tok_embeddings.weight": (s["vocab_size"], s["dim"]), "norm.weight": (s["dim"],),
              "output.weight": (s["vocab_size"], s["dim"])}
    for i in range(s["n_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (s["dim"], s["dim"]),
            p + "attention.wk.weight": (s["n_kv_heads"] * head, s["dim"]),
            p + "attention.wv.weight": (s["n_kv_heads"] * head, s["dim"]),
            p + "attention.wo.weight": (s["dim"], s["dim"]),
            p + "feed_forward.w1.weight": (s["hidden"], s["dim"]),
            p + "feed_forward.w2.weight": (s["dim"], s["hidden"]),
            p + "feed_forward.w3.weight": (s["hidden"], s["dim"]),
            p + "attention_norm.weight": (s["dim"],),
            p + "ffn_norm.weight": (s["dim"],),
        })
    return shapes


HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(meta: str) -> str | None:
    if meta == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if meta == "norm.weight":
        return "model.norm.weight"
    if meta == "output.weight":
        return None  # tied embeddings, as Llama 3.2 1B
    _, i, rest = meta.split(".", 2)
    return f"model.layers.{i}.{HF_NAMES[rest.removesuffix('.weight')]}.weight"


def random_tensor(shape, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float32) - 0.5).mul_(0.04).to(torch.bfloat16)


def write_checkpoints(work: Path, shape: str) -> None:
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    s = SHAPES[shape]
    shapes = meta_shapes(s)
    hf = work / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(k): random_tensor(v, i) for i, (k, v) in enumerate(shapes.items()) if hf_name(k)}
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["dim"],
        "num_hidden_layers": s["n_layers"], "num_attention_heads": s["n_heads"], "num_key_value_heads": s["n_kv_heads"],
        "intermediate_size": s["hidden"], "vocab_size": s["vocab_size"], "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    meta = work / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    split = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "output": 0, "tok_embeddings": 1}
    for rank in range(2):  # one shard in memory at a time
        shard = {}
        for i, (k, v) in enumerate(shapes.items()):
            t = random_tensor(v, i)
            axis = split.get(k.split(".")[-2])
            shard[k] = t if axis is None else t.chunk(2, dim=axis)[rank].clone()
        torch.save(shard, meta / f"consolidated.{rank:02d}.pth")
        del shard
    params = {k: s[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim_multiplier", "multiple_of")}
    params.update(norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0)
    (meta / "params.json").write_text(json.dumps(params))


def child(step: str, checkpoint: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    if step == "import":
        import titans_runtime.model.convert  # noqa: F401  (the fixed cost: torch, safetensors, the model code)
        return
    from titans_runtime.model.checkpoint import load_model
    from titans_runtime.model.convert import convert_to_folder, create_titan_model

    start = time.perf_counter()
    if step == "create":
        model = create_titan_model(checkpoint)
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    elif step == "convert_to_folder":
        convert_to_folder(checkpoint, out)
        n_bytes = (Path(out) / "model.safetensors").stat().st_size
    elif step == "create_from_folder":  # our own folder, through the same lazy loader
        model = create_titan_model(out)
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    else:  # checkpoint.load_model of the converted folder (load_file + load_state_dict), for comparison
        model = load_model(out)
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"seconds": time.perf_counter() - start, "model_bytes": n_bytes}))


def run_child(step: str, checkpoint: Path, out: Path) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", step, str(checkpoint), str(out)],
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"error: child {step} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    result["peak_rss"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return result


def dir_size(path: Path, pattern: str) -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp folder, removed)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="titans_convert_mem_"))
    gib = 1024 ** 3
    try:
        t0 = time.perf_counter()
        if not (work / "meta" / "params.json").is_file():
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import measure_convert_memory as m; m.write_checkpoints(__import__('pathlib').Path({str(work)!r}), {args.shape!r})"],
                           check=True)
            print(f"wrote random {args.shape} checkpoints in {time.perf_counter() - t0:.0f}s under {work}")
        base = run_child("import", work, work)["peak_rss"]
        print(f"import-only child peak RSS: {base / gib:.2f} GiB")
        print(f"{'layout':6} {'step':18} {'on disk':>9} {'weights':>9} {'peak RSS':>9} {'net':>9} "
              f"{'net/disk':>8} {'net/weights':>11} {'time':>6}")
        for layout, pattern in (("hf", "*.safetensors"), ("meta", "*.pth")):
            ckpt, out = work / layout, work / f"{layout}_titans"
            disk = dir_size(ckpt, pattern)
            for step in ("create", "convert_to_folder", "create_from_folder", "load_model"):
                r = run_child(step, ckpt, out)
                net = r["peak_rss"] - base
                print(f"{layout:6} {step:18} {disk / gib:8.2f}G {r['model_bytes'] / gib:8.2f}G "
                      f"{r['peak_rss'] / gib:8.2f}G {net / gib:8.2f}G {net / disk:8.2f} "
                      f"{net / r['model_bytes']:11.2f} {r['seconds']:5.0f}s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
