"""Convert a LLaMA checkpoint (Meta or Hugging Face layout) into a Titans model folder.

    python tools/convert_llama.py --checkpoint llama-2-7b/ --out models/llama2-7b-mac --variant mac
    python tools/convert_llama.py --checkpoint Llama-3.2-1B/ --out models/l32-mag --variant mag \\
        --config configs/llama-7b-mag.yaml --max-seq-len 4096 --set "memory.layers=[3, 7, 11, 15]"

The output folder (config.yaml + model.safetensors + the checkpoint's tokenizer) is what
`launch/run.py --model DIR` and `titans_runtime.create_titan_model(DIR)` load. The memory starts closed:
the model's logits equal the LLaMA's for inputs up to --max-seq-len tokens until the memory is trained.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from titans_runtime.errors import TitansError, report_error


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TitansError(f"--set expects KEY=VALUE (a dotted config key), got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="LLaMA folder: params.json + consolidated.*.pth, "
                        "or config.json + *.safetensors / pytorch_model*.bin")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--variant", choices=("mac", "mag", "mal"), default=None, help="default: the --config's, else mac")
    parser.add_argument("--config", default=None, help="Titans YAML for variant/attention/memory/persistent/dtype "
                        "(its model section is ignored: the checkpoint defines the backbone)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="attention window / segment (default min(2048, the checkpoint's context))")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="weight dtype of the output (default: the checkpoint's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, e.g. --set memory.depth=1 (repeatable)")
    args = parser.parse_args(argv)
    try:
        from titans_runtime.model.convert import convert_to_folder

        overrides = parse_overrides(args.set)
        if args.dtype:
            overrides["dtype"] = args.dtype
        start = time.perf_counter()
        out = convert_to_folder(args.checkpoint, args.out, variant=args.variant, config=args.config,
                                max_seq_len=args.max_seq_len, **overrides)
    except TitansError as exc:
        return report_error(exc)
    from titans_runtime.config import load_config

    cfg = load_config(Path(out) / "config.yaml")
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s: {cfg.variant}, {cfg.model.n_layers} layers x "
          f"{cfg.model.dim}, vocab {cfg.model.vocab_size}, {cfg.dtype}, memory layers {cfg.memory_layers}, "
          f"window {cfg.attention.window}, tokenizer {cfg.tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
