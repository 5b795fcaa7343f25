"""The training loop: truncated back-propagation through time over consecutive segments.

A batch row is one sequence of `windows_per_sequence * tbptt_segments` segments (or, for the long
plain-text streams of `long_text_share`, `long_text_windows * tbptt_segments`; see stream_plan). The model
reads it segment by segment, carrying its StreamState (attention caches, long-term memory fast weights,
momentum), so the outer loop learns to write memory that later segments read. Gradients flow through the
memory across the `tbptt_segments` of one window; between windows the state is detached (and carried on);
a new sequence starts from a fresh state. One optimiser step per window.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from titans_runtime.config import TitansConfig, load_config
from titans_runtime.errors import ConfigError
from titans_runtime.model.checkpoint import load_model, save_model
from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import TitanModel
from titans_runtime.model.tokenizer import load_tokenizer
from titans_runtime.training.checkpoint import load_checkpoint, save_checkpoint
from titans_runtime.training.config import TrainConfig
from titans_runtime.training.data import Corpus, SequenceBatches, load_corpus
from titans_runtime.training.schedule import learning_rate
from titans_runtime.training.stream_plan import LONG_TEXT, MIXED, StreamPlan

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "log.jsonl"
MAX_SKIPPED = 10  # non-finite windows tolerated (skipped) before training stops


def resolve_path(path: str, base: Path | None = None) -> Path:
    """A path as given (cwd), else relative to `base` (the training config's folder), else the repo root."""
    candidates = [Path(path)] + ([base / path] if base is not None else []) + [REPO_ROOT / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return Path(path)


def parameter_group(name: str) -> str:
    """Which `--train` group a parameter belongs to."""
    if ".out_gate." in name or name.endswith("output_scale") or name.endswith("extra_gate"):
        return "gates"
    if name.startswith("memory."):
        return "memory"
    if name == "persistent.banks":
        return "persistent"
    return "core"


def build_model(cfg: TrainConfig, base: Path | None) -> TitanModel:
    if cfg.init is not None:
        model = load_model(resolve_path(cfg.init, base))
        if cfg.model_overrides:
            raise ConfigError("model_overrides: not allowed with init (the model folder fixes the config)")
        return model
    model_cfg: TitansConfig = load_config(resolve_path(cfg.model, base))
    if cfg.model_overrides:
        model_cfg = model_cfg.replace(**cfg.model_overrides)
    return TitanModel(model_cfg)


def make_optimizer(model: TitanModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the selected groups; weight decay on matrices only; `optim.lr_scale` per group."""
    # Keyed (decays, lr scale); the two unscaled groups always exist, decayed first: the layout from before
    # lr_scale, so its checkpoints resume.
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, param in model.named_parameters():
        group = parameter_group(name)
        param.requires_grad_(group in cfg.train)
        if param.requires_grad:
            decays = param.dim() >= 2 and "extra_gate" not in name
            groups.setdefault((decays, float(cfg.optim.lr_scale.get(group, 1.0))), []).append(param)
    if not any(groups.values()):
        raise ConfigError(f"train: the groups {cfg.train} select no parameter of this model")
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": cfg.optim.weight_decay if decays else 0.0, "lr_scale": scale}
         for (decays, scale), params in groups.items()],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))


def sequence_loss(model: TitanModel, tokens: Tensor, state: StreamState, segment_len: int,
                  checkpointing: bool = False, weights: Tensor | None = None) -> tuple[Tensor, StreamState]:
    """Summed next-token NLL over `tokens` (B, n+1) read segment by segment, carrying `state`; with
    `weights` (B, n+1), token i's loss counts weights[:, i] times."""
    total = tokens.new_zeros((), dtype=torch.float32)

    def run(inp: Tensor, st: StreamState) -> tuple[Tensor, StreamState]:
        out = model(inp, state=st)
        return out.logits, out.state

    steps = tokens.shape[1] - 1
    for start in range(0, steps, segment_len):
        end = min(steps, start + segment_len)
        inp, target = tokens[:, start:end], tokens[:, start + 1:end + 1]
        if checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            logits, state = checkpoint(run, inp, state, use_reentrant=False)
        else:
            logits, state = run(inp, state)
        nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")
        if weights is not None:
            nll = nll * weights[:, start + 1:end + 1].flatten()
        total = total + nll.sum()
    return total, state


@dataclass
class StepResult:
    step: int
    loss: float              # mean next-token NLL (nats) of the window, weighted by the data's loss weights
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


@dataclass
class Trainer:
    cfg: TrainConfig
    out_dir: Path
    config_dir: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    export_dir: Path | None = None   # save_model here at every checkpoint and at the end

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        torch.manual_seed(self.cfg.seed)  # the initial weights are a function of the seed
        self.model = build_model(self.cfg, self.config_dir).to(self.device)
        self.model_cfg = self.model.config
        self.segment_len = self.model_cfg.attention.segment_len
        self.optimizer = make_optimizer(self.model, self.cfg)
        # A relative tokenizer path belongs to the model folder (a converted LLaMA keeps its tokenizer there).
        model_dir = resolve_path(self.cfg.init, self.config_dir) if self.cfg.init is not None else self.config_dir
        self.tokenizer = load_tokenizer(self.model_cfg.tokenizer, model_dir)
        files = [str(resolve_path(f, self.config_dir)) for f in self.cfg.data.files]
        self.corpus: Corpus = load_corpus(files, self.tokenizer, self.cfg.data.holdout_fraction)
        self.window_len = self.cfg.tbptt_segments * self.segment_len
        length = self.cfg.windows_per_sequence * self.window_len + 1
        reach = self.segment_len if self.model_cfg.variant == "mac" else self.model_cfg.attention.window
        gap = int(self.cfg.data.min_gap_windows * reach)
        pieces = self.cfg.windows_per_sequence if self.cfg.data.task_per_window else 1
        self.batches = SequenceBatches(self.corpus, self.tokenizer, self.cfg.data, self.cfg.batch_size, length, gap,
                                       self.cfg.seed, pieces=pieces)
        text_only = type(self.cfg.data)(**{**self.cfg.data.__dict__, "synthetic_fraction": 0.0})
        self.long_batches = None if self.cfg.long_text_windows == 0 else SequenceBatches(
            self.corpus, self.tokenizer, text_only, self.cfg.batch_size, self.cfg.long_text_windows * self.window_len + 1,
            gap, self.cfg.seed + 3)
        self.plan = StreamPlan(self.cfg.windows_per_sequence, self.cfg.long_text_windows, self.cfg.long_text_share,
                               self.cfg.seed)
        synth_only = type(self.cfg.data)(**{**self.cfg.data.__dict__, "synthetic_fraction": 1.0})
        self.eval_sets = {
            "text": SequenceBatches(self.corpus, self.tokenizer, text_only, self.cfg.batch_size, length, gap,
                                    self.cfg.seed + 1, "heldout"),
            "synthetic": SequenceBatches(self.corpus, self.tokenizer, synth_only, self.cfg.batch_size, length, gap,
                                         self.cfg.seed + 2, "heldout", pieces),
        }
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.carried: StreamState | None = None
        self.skipped = 0  # windows skipped for a non-finite loss
        self._cached: tuple[tuple[str, int], tuple[Tensor, Tensor]] | None = None

    # ------------------------------------------------------------------------------------ plumbing
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_FILE

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def sequence_batch(self, index: int, kind: str = MIXED) -> tuple[Tensor, Tensor]:
        """Tokens and loss weights of training batch `index` of `kind` (the windows of one batch reuse it)."""
        if self._cached is None or self._cached[0] != (kind, index):
            batches = self.long_batches if kind == LONG_TEXT else self.batches
            tokens, weights = batches.weighted(index)
            self._cached = ((kind, index), (tokens.to(self.device), weights.to(self.device)))
        return self._cached[1]

    # -------------------------------------------------------------------------------------- steps
    def train_step(self) -> StepResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        planned = self.plan.at(self.step)
        window = planned.window
        tokens, weights = self.sequence_batch(planned.index, planned.kind)
        start = window * self.window_len
        chunk = tokens[:, start:start + self.window_len + 1]
        chunk_weights = weights[:, start:start + self.window_len + 1]
        state = self.model.initial_state(cfg.batch_size) if window == 0 or self.carried is None else self.carried
        lr = learning_rate(self.step, cfg.steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # (absent in checkpoints from before lr_scale)
        self.model.train()
        with self.autocast():
            total, state = sequence_loss(self.model, chunk, state, self.segment_len, cfg.activation_checkpointing,
                                         chunk_weights)
        n_tokens = chunk.numel() - chunk.shape[0]
        loss = total / chunk_weights[:, 1:].sum().clamp_min(1.0)  # the weighted mean
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            # A diverged window (e.g. an inner-loop blow-up): skip the update, restart the stream state.
            self.skipped += 1
            if self.skipped > MAX_SKIPPED:
                raise FloatingPointError(f"step {self.step}: loss is {float(loss)} ({self.skipped} windows skipped)")
            self.carried = None
            self.step += 1
            seconds = time.perf_counter() - t0
            self.elapsed += seconds
            return StepResult(self.step, float("nan"), lr, float("nan"), 0, seconds)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.optim.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
        else:
            grad_norm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)))
        self.optimizer.step()
        last_window = window == planned.windows - 1
        self.carried = None if last_window else state.detach()
        self.step += 1
        self.tokens_seen += n_tokens
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        return StepResult(self.step, loss.item(), lr, grad_norm, n_tokens, seconds)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean NLL (nats/token) on fixed held-out sequences: plain text and synthetic long-range tasks."""
        self.model.eval()
        result = {}
        for name, batches in self.eval_sets.items():
            total, count = 0.0, 0
            for index in range(self.cfg.eval_batches):
                tokens = batches[index].to(self.device)
                with self.autocast():
                    loss, _ = sequence_loss(self.model, tokens, self.model.initial_state(tokens.shape[0]),
                                            self.segment_len)
                total += float(loss)
                count += tokens.numel() - tokens.shape[0]
            result[f"{name}_loss"] = total / count
            result[f"{name}_bits_per_token"] = total / count / math.log(2)
        return result

    # --------------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        info = {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed, "skipped": self.skipped,
                "train_config": self.cfg.to_dict(), "model_config": self.model_cfg.to_dict()}
        save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.carried, info)
        if self.export_dir is not None:
            save_model(self.model, self.export_dir)

    def resume(self) -> None:
        info, self.carried = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.device)
        self.step, self.tokens_seen, self.elapsed = info["step"], info["tokens_seen"], info["elapsed_s"]
        self.skipped = info.get("skipped", 0)
        self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log records written after the checkpoint (they will be written again)."""
        if not self.log_path.is_file():
            return
        keep = [line for line in self.log_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        self.log_path.write_text("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------------------------------ run
    def run(self, stop_at: int | None = None, max_seconds: float | None = None,
            on_step: Callable[[StepResult], None] | None = None,
            on_eval: Callable[[int, dict], None] | None = None) -> list[StepResult]:
        """Train until cfg.steps (or `stop_at`, or `max_seconds` of wall time); checkpoint on the way
        and at the end. Returns the steps run by this call."""
        last = min(self.cfg.steps, stop_at) if stop_at is not None else self.cfg.steps
        started = time.perf_counter()
        results = []
        while self.step < last:
            res = self.train_step()
            results.append(res)
            if math.isnan(res.loss):
                self.log({"step": res.step, "skipped": "non-finite loss", "lr": res.lr, "elapsed_s": self.elapsed})
            else:
                self.log({"step": res.step, "loss": res.loss, "bits_per_token": res.loss / math.log(2), "lr": res.lr,
                          "grad_norm": res.grad_norm, "tokens": self.tokens_seen, "step_s": res.seconds,
                          "elapsed_s": self.elapsed})
            if on_step is not None:
                on_step(res)
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                metrics = self.evaluate()
                self.log({"step": self.step, "eval": metrics})
                if on_eval is not None:
                    on_eval(self.step, metrics)
            out_of_time = max_seconds is not None and time.perf_counter() - started >= max_seconds
            if self.step % self.cfg.checkpoint_every == 0 or self.step == last or out_of_time:
                self.save()
            if out_of_time:
                break
        return results
