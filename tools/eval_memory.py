"""Does the long-term memory work? Repeat-after-gap, pass-key retrieval and bits per byte, memory on/off.

    python tools/eval_memory.py --model default
    python tools/eval_memory.py --model mac=runs/default/checkpoint/model --model swa=runs/baseline_swa/checkpoint/model \
        --plot docs/passkey.png --json runs/eval.json

Haystacks, filler and the bits-per-byte text come from the held-out tail of every corpus file (the same
--holdout-fraction as training), i.e. text the model was not trained on. "--memory off" resets the
long-term memory at every attention segment. The PNG is drawn with numpy + zlib (no matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from titans_runtime.errors import TitansError, report_error  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=None,
                   help="model folder or `default`, optionally NAME=FOLDER (repeatable)")
    p.add_argument("--data", action="append", default=None, help="corpus files/folders (default ../shared/data/corpora)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="tail of each file held out in training")
    p.add_argument("--memory", choices=["on", "off", "both"], default="both")
    p.add_argument("--evals", default="repeat,passkey,bpb", help="which evaluations (comma separated)")
    p.add_argument("--trials", type=int, default=50, help="pass-key trials per haystack length")
    p.add_argument("--lengths", default="1,2,4,8,16,32,64", help="haystack lengths, in attention windows")
    p.add_argument("--passage", type=int, default=128, help="repeat-after-gap passage tokens")
    p.add_argument("--gap", type=int, default=8, help="repeat-after-gap filler, in attention windows (>= 8)")
    p.add_argument("--repeat-trials", type=int, default=32)
    p.add_argument("--warm", type=int, default=0,
                   help="start every repeat and pass-key stream with this many attention windows of other "
                        "held-out text (a warm memory, as in a long stream); 0: the key opens its stream, A follows "
                        "one window of text")
    p.add_argument("--bpb-streams", type=int, default=8)
    p.add_argument("--bpb-tokens", type=int, default=4096)
    p.add_argument("--bpb-positions", default=None,
                   help="also bits per token by stream position, cut here (e.g. 256,1280,2560)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", help="PNG of pass-key accuracy vs haystack length")
    p.add_argument("--plot-model", action="append", default=None,
                   help="plot only this model, NAME or NAME=LEGEND (repeatable, in this order); default: every model")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--markdown", help="write the table as markdown here (for the README)")
    p.add_argument("--from-json", action="append", default=None,
                   help="merge results written by earlier runs' --json (e.g. one run per model and memory "
                        "setting in parallel) instead of evaluating; prints the table, writes --plot/--markdown")
    return p.parse_args(argv)


def merge(args: argparse.Namespace, lengths: list[int]) -> int:
    """Combine --json files: models with the same name merge their memory settings."""
    results: dict = {}
    for path in args.from_json:
        data = json.loads(Path(path).read_text())["results"]
        for name, res in data.items():
            merged = results.setdefault(name, {**res, "memory": {}})
            merged["memory"].update(res["memory"])
    table = markdown_table(results, lengths)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(args.plot, results, lengths, args.plot_model)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def plot_legends(known: list[str], specs: list[str] | None) -> dict[str, str]:
    """--plot-model NAME[=LEGEND] values -> {model name: legend}, in order; every known model if none."""
    from titans_runtime.errors import InputError

    legends = {}
    for spec in specs or known:
        name, _, legend = spec.rpartition("=") if spec not in known and "=" in spec else (spec, "", spec)
        if name not in known:
            raise InputError(f"--plot-model: no model named {name!r} (known: {', '.join(known)})")
        legends[name] = legend
    return legends


def plot(path: str, results: dict, lengths: list[int], names: list[str] | None = None) -> None:
    from titans_runtime.evaluation.png_plot import accuracy_plot

    series = []
    for name, legend in plot_legends(list(results), names).items():
        for label, row in results[name]["memory"].items():
            pk = row.get("passkey", {})
            if all(str(m) in pk for m in lengths):
                series.append((f"{legend} memory {label}" if label != "none" else legend,
                               [pk[str(m)]["accuracy"] for m in lengths], label == "off"))
    accuracy_plot(path, [float(m) for m in lengths], series, "PASS-KEY ACCURACY VS HAYSTACK LENGTH",
                  "HAYSTACK (X ATTENTION WINDOW)")


def markdown_table(results: dict, lengths: list[int]) -> str:
    """One row per model and memory setting; pass-key cells are exact-match accuracy (digit accuracy)."""
    head = ["model", "variant", "params", "memory", "repeat: loss 1st -> 2nd (ratio)"]
    head += [f"pass-key {m}x" for m in lengths] + ["bits/byte"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        for label, row in res["memory"].items():
            cells = [name, res["variant"], f"{res['params']:,}", label]
            rep = row.get("repeat")
            cells.append(f"{rep['first']:.3f} -> {rep['second']:.3f} ({rep['ratio']:.3f})" if rep else "-")
            for m in lengths:
                pk = row.get("passkey", {}).get(str(m))
                cells.append(f"{pk['accuracy']:.0%} ({pk['digit_accuracy']:.0%})" if pk else "-")
            cells.append(f"{row['bits_per_byte']:.3f}" if "bits_per_byte" in row else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except TitansError as exc:
        return report_error(exc)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from titans_runtime.errors import InputError
    from titans_runtime.evaluation import memory as ev
    from titans_runtime.model.checkpoint import load_model
    from titans_runtime.model.tokenizer import load_tokenizer
    from titans_runtime.training.data import load_corpus
    from titans_runtime.training.loop import resolve_path

    torch.set_num_threads(args.threads)
    console = Console()
    evals = {e.strip() for e in args.evals.split(",") if e.strip()}
    if evals - {"repeat", "passkey", "bpb"}:
        raise InputError(f"--evals: unknown evaluation {sorted(evals - {'repeat', 'passkey', 'bpb'})[0]!r}")
    if args.gap < 8:
        raise InputError("--gap: must be at least 8 attention windows")
    if args.warm < 0:
        raise InputError("--warm: must be 0 or more attention windows")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise InputError(f"--lengths: expected comma-separated integers, got {args.lengths!r}") from None
    try:
        cuts = [int(x) for x in args.bpb_positions.split(",")] if args.bpb_positions else []
    except ValueError:
        raise InputError(f"--bpb-positions: expected comma-separated integers, got {args.bpb_positions!r}") from None
    if cuts:
        try:  # checked before any model is read: a stream of --bpb-tokens has one prediction fewer
            ev.check_position_cuts(cuts, args.bpb_tokens - 1)
        except ValueError as exc:
            raise InputError(f"--bpb-positions: {exc} (--bpb-tokens {args.bpb_tokens})") from None
    if args.from_json:
        return merge(args, lengths)
    specs = args.model or ["default"]
    models = {}
    for spec in specs:
        name, _, folder = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        models[name or folder] = load_model(folder)
    if args.plot:
        plot_legends(list(models), args.plot_model)  # a wrong name fails now, not after the evaluation
    memories = {"on": [True], "off": [False], "both": [True, False]}[args.memory]
    files = [str(resolve_path(f)) for f in (args.data or ["../shared/data/corpora"])]
    results: dict = {}
    warm = f", warm memory: {args.warm} windows of other text first" if args.warm else ""
    table = Table(title=f"Memory at test time (held-out text{warm})")
    for col in ("model", "variant", "params", "memory", "repeat 2nd/1st", "pass-key acc by haystack x window", "bits/byte"):
        table.add_column(col)
    for name, model in models.items():
        cfg = model.config
        tokenizer = load_tokenizer(cfg.tokenizer)
        corpus = load_corpus(files, tokenizer, args.holdout_fraction)
        window = ev.window_len(model)
        has_memory = bool(model.memory_layer_ids)
        n_params = sum(p.numel() for p in model.parameters())
        results[name] = {"variant": cfg.variant, "params": n_params, "window": window, "memory": {}}
        for memory in (memories if has_memory else [True]):
            label = ("on" if memory else "off") if has_memory else "none"
            row: dict = {}
            t0 = time.perf_counter()
            if "repeat" in evals:
                rng = np.random.default_rng([args.seed, 1])
                tokens, first, second = ev.repeat_batch(corpus, rng, args.repeat_trials, args.passage,
                                                        args.gap * window, (1 + args.warm) * window)
                r = ev.repeat_after_gap(model, tokens, first, second, args.passage, memory)
                row["repeat"] = {"first": r.first, "second": r.second, "ratio": r.ratio, "gap": r.gap}
            if "passkey" in evals:
                row["passkey"] = {}
                for mult in lengths:
                    rng = np.random.default_rng([args.seed, 2, mult])
                    tokens, a0, a1 = ev.passkey_batch(corpus, tokenizer, rng, args.trials, mult * window,
                                                        warm=args.warm * window)
                    pk = ev.passkey(model, tokens, a0, a1, memory)
                    row["passkey"][str(mult)] = {"accuracy": pk.accuracy, "digit_accuracy": pk.digit_accuracy,
                                                 "haystack": mult * window, "trials": pk.trials}
            if "bpb" in evals:
                rng = np.random.default_rng([args.seed, 3])
                tokens = ev.text_batch(corpus, rng, args.bpb_streams, args.bpb_tokens)
                nll, _ = ev.stream_predictions(model, tokens, memory)
                row["bits_per_byte"] = ev.nll_bits_per_byte(nll, tokens, tokenizer)
                if cuts:
                    bits = ev.bits_by_position(nll, cuts)
                    row["bits_by_position"] = {"cuts": cuts, "bits_per_token": bits}
                    edges = [0, *cuts, args.bpb_tokens - 1]
                    stretches = " / ".join(f"{a}-{b}" for a, b in zip(edges, edges[1:]))
                    console.print(f"{name} memory {label}: bits per token by position {stretches}: "
                                  + " / ".join(f"{b:.3f}" for b in bits), soft_wrap=True)
            row["seconds"] = time.perf_counter() - t0
            results[name]["memory"][label] = row
            rep = f"{row['repeat']['ratio']:.3f}" if "repeat" in row else "-"
            pks = " ".join(f"{m}x:{row['passkey'][str(m)]['accuracy']:.0%}" for m in lengths) if "passkey" in row else "-"
            bpb = f"{row['bits_per_byte']:.3f}" if "bits_per_byte" in row else "-"
            table.add_row(name, cfg.variant, f"{n_params:,}", label, rep, pks, bpb)
            console.print(f"{name} memory {label}: done in {row['seconds']:.0f}s")
    console.print(table)
    if args.plot and "passkey" in evals:
        plot(args.plot, results, lengths, args.plot_model)
        console.print(f"plot: {args.plot}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results, lengths))
        console.print(f"markdown: {args.markdown}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
