"""Training: the loss goes down, resume is exact, TBPTT/checkpointing/freezing do what they say."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titans_runtime.config import config_from_dict
from titans_runtime.errors import ConfigError
from titans_runtime.model.titans import TitanModel
from titans_runtime.model.tokenizer import ByteTokenizer
from titans_runtime.training.config import DataConfig, TrainConfig, load_train_config
from titans_runtime.training.data import (Corpus, load_corpus, noise_repeat_sequence, passkey_example, passkey_sequence,
                                          SequenceBatches, repeat_sequence)
from titans_runtime.training.loop import Trainer, parameter_group, sequence_loss
from titans_runtime.training.schedule import learning_rate
from titans_runtime.training.stream_plan import LONG_TEXT, MIXED, StreamPlan

REPO = Path(__file__).resolve().parents[1]

MICRO = {
    "name": "micro", "variant": "mac", "dtype": "float32", "tokenizer": "byte",
    "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 256, "multiple_of": 16},
    "attention": {"window": 16, "segment_len": 16},
    "memory": {"layers": [1], "heads": 2, "depth": 2, "chunk_size": 8, "conv_kernel": 2},
    "persistent": {"n_tokens": 2, "n_tasks": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def micro_setup(tmp_path: Path, **overrides) -> TrainConfig:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), 3000))
    (tmp_path / "corpus.txt").write_text(text)
    model_path = tmp_path / "micro.yaml"
    config_from_dict(MICRO).save(model_path)
    cfg = TrainConfig(model=str(model_path), data=DataConfig(files=[str(tmp_path / "corpus.txt")], passage_min=4,
                                                             passage_max=12),
                      steps=6, batch_size=2, tbptt_segments=2, windows_per_sequence=2, eval_every=100,
                      eval_batches=1, checkpoint_every=100, seed=3)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.optim.warmup_steps = 2
    return cfg


def test_training_lowers_the_loss(tmp_path):
    cfg = micro_setup(tmp_path, steps=30)
    cfg.optim.lr = 1e-2
    trainer = Trainer(cfg, tmp_path / "run")
    before = trainer.evaluate()["text_loss"]
    results = trainer.run()
    after = trainer.evaluate()["text_loss"]
    assert len(results) == 30 and trainer.step == 30
    assert after < before - 0.5, (before, after)
    assert np.mean([r.loss for r in results[-5:]]) < np.mean([r.loss for r in results[:5]])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 31))
    assert any("eval" in r for r in log)  # the last step always evaluates


def test_resume_continues_exactly(tmp_path):
    cfg = micro_setup(tmp_path, steps=6)
    cfg.optim.lr_scale = {"gates": 3.0}  # per-group learning rates survive the checkpoint too
    straight = Trainer(cfg, tmp_path / "a")
    losses_a = [r.loss for r in straight.run()]
    first = Trainer(cfg, tmp_path / "b")
    losses_b = [r.loss for r in first.run(stop_at=3)]  # step 3 is mid-sequence: the carried state is saved
    assert first.carried is not None
    resumed = Trainer(cfg, tmp_path / "b")
    resumed.resume()
    assert resumed.step == 3
    losses_b += [r.loss for r in resumed.run()]
    assert losses_a == losses_b
    for (name, pa), pb in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_tbptt_carries_memory_between_windows(tmp_path):
    """The second window starts from the first window's (detached) state, not a fresh one."""
    cfg = micro_setup(tmp_path)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train_step()
    carried = trainer.carried
    assert carried is not None and carried.position == cfg.tbptt_segments * 16
    assert all(not t.requires_grad for t in carried.to_flat().values())
    fresh = trainer.model.initial_state(cfg.batch_size)
    assert not torch.equal(carried.memory["1"]["w0"], fresh.memory["1"]["w0"])
    trainer.train_step()
    assert trainer.carried is None  # end of the sequence: the next one starts fresh


def test_gradient_reaches_memory_written_earlier_in_the_window():
    """Loss on the second segment has a gradient w.r.t. the memory's key projection through the fast
    weights written in the first segment (the outer loop learns what to write)."""
    torch.manual_seed(0)
    model = TitanModel(config_from_dict({**MICRO, "dtype": "float64"}))
    tokens = torch.randint(0, 256, (1, 33))
    loss, _ = sequence_loss(model, tokens[:, :17], model.initial_state(1), 16)  # one segment: read only
    state = model.initial_state(1)
    _, state = sequence_loss(model, tokens[:, :17], state, 16)
    second, _ = sequence_loss(model, tokens[:, 16:33], state, 16)
    to_k = model.memory.memories["1"].to_k.weight
    (g,) = torch.autograd.grad(second, to_k)
    assert g.abs().max() > 0


def test_loss_weights_count_each_token_that_many_times():
    torch.manual_seed(0)
    model = TitanModel(config_from_dict({**MICRO, "dtype": "float64"}))
    tokens = torch.randint(0, 256, (2, 33))
    plain, _ = sequence_loss(model, tokens, model.initial_state(2), 16)
    ones, _ = sequence_loss(model, tokens, model.initial_state(2), 16, weights=torch.ones(2, 33))
    torch.testing.assert_close(ones, plain)
    # One token (row 1, position 20: the target of the 20th input) weighted 3, the rest 0.
    weights = torch.zeros(2, 33)
    weights[1, 20] = 3.0
    one, _ = sequence_loss(model, tokens, model.initial_state(2), 16, weights=weights)
    logits = model(tokens[:, :-1]).logits
    expected = 3.0 * F.cross_entropy(logits[1, 19], tokens[1, 20])
    torch.testing.assert_close(one, expected.to(one.dtype))


def test_training_step_loss_is_the_weighted_mean(tmp_path):
    """With noise repeats only, a step's loss is the NLL of the second readings alone (weights from the data)."""
    cfg = micro_setup(tmp_path, windows_per_sequence=1)  # the whole sequence in the first step's window
    cfg.data.synthetic_fraction, cfg.data.passkey_share, cfg.data.noise_share = 1.0, 0.0, 1.0
    cfg.data.noise_weight = 2.5
    trainer = Trainer(cfg, tmp_path / "run")
    tokens, weights = trainer.batches.weighted(0)
    chunk, chunk_weights = tokens[:, :trainer.window_len + 1], weights[:, :trainer.window_len + 1]
    assert 0 < chunk_weights.sum() < chunk_weights.numel(), "the window must hold part of a second reading"
    with torch.no_grad():
        total, _ = sequence_loss(trainer.model, chunk, trainer.model.initial_state(2), trainer.segment_len,
                                 weights=chunk_weights)
    expected = float(total / chunk_weights[:, 1:].sum())
    assert trainer.train_step().loss == pytest.approx(expected, rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = TitanModel(config_from_dict({**MICRO, "dtype": "float64"}))
    tokens = torch.randint(0, 256, (2, 49))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        loss, _ = sequence_loss(model, tokens, model.initial_state(2), 16, checkpointing)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12)


def test_frozen_groups_stay_fixed(tmp_path):
    cfg = micro_setup(tmp_path, steps=2, train=["memory", "persistent"])
    trainer = Trainer(cfg, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (parameter_group(name) in ("memory", "persistent")), name


def test_parameter_groups():
    assert parameter_group("core.layers.0.attention.wq.weight") == "core"
    assert parameter_group("persistent.output.weight") == "core"  # the LM head belongs to the backbone
    assert parameter_group("persistent.banks") == "persistent"
    assert parameter_group("memory.memories.1.to_k.weight") == "memory"
    assert parameter_group("memory.memories.1.out_gate.weight") == "gates"
    assert parameter_group("memory.memories.1.output_scale") == "gates"
    assert parameter_group("core.layers.1.attention.extra_gate") == "gates"


def test_lr_scale_multiplies_one_groups_learning_rate(tmp_path):
    cfg = micro_setup(tmp_path, steps=4)
    cfg.optim.lr_scale = {"gates": 10.0}
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train_step()
    gates = {id(p) for n, p in trainer.model.named_parameters() if parameter_group(n) == "gates"}
    rates = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            rates[id(param)] = group["lr"]
    base = learning_rate(0, 4, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    assert gates and all(math.isclose(rates[i], 10 * base) for i in gates)
    assert all(math.isclose(rate, base) for i, rate in rates.items() if i not in gates)
    (tmp_path / "bad.yaml").write_text("optim: {lr_scale: {gate: 2}}\n")
    with pytest.raises(ConfigError, match="optim.lr_scale"):
        load_train_config(tmp_path / "bad.yaml")


def test_schedule_warmup_then_cosine():
    assert learning_rate(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_synthetic_tasks():
    rng = np.random.default_rng(0)
    text = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz" * 40), dtype=torch.int32)
    corpus = Corpus(["t"], [text], [text])
    seq, weights = repeat_sequence(corpus, rng, 400, DataConfig(passage_min=20, passage_max=20), min_gap=128)
    assert seq.numel() == 400 and bool((weights == 1).all())
    # A shuffled passage: the same 20 tokens twice, at least 128 apart, and not in the corpus' order.
    seq, weights = repeat_sequence(corpus, rng, 400, DataConfig(passage_min=20, passage_max=20, shuffled_share=1.0,
                                                                recall_weight=4.0), min_gap=128)
    windows = {tuple(seq[i:i + 20].tolist()): i for i in range(381)}
    twice = [w for w in windows if sum(tuple(seq[i:i + 20].tolist()) == w for i in range(381)) == 2]
    assert twice, "the passage must occur twice"
    passage = twice[0]
    assert any(b != (a + 1 - 97) % 26 + 97 for a, b in zip(passage, passage[1:])), "passage not shuffled"
    # recall_weight on the second reading only: 20 tokens weigh 4, the other 380 weigh 1.
    second = max(i for i in range(381) if tuple(seq[i:i + 20].tolist()) == passage)
    assert bool((weights[second:second + 20] == 4).all()) and float(weights.sum()) == 380 + 4 * 20
    # context_weight 0: the second reading is all the loss sees.
    _, weights = repeat_sequence(corpus, rng, 400, DataConfig(passage_min=20, passage_max=20, context_weight=0.0),
                                 min_gap=128)
    assert float(weights.sum()) == 20 and int((weights == 1).sum()) == 20
    # Noise: random tokens from a small alphabet of the corpus' tokens, with the passage twice.
    cfg = DataConfig(passage_min=20, passage_max=20, noise_share=1.0, noise_alphabet=8)
    seq, weights = noise_repeat_sequence(corpus, rng, 400, cfg, min_gap=128)
    assert seq.numel() == 400 and seq.unique().numel() <= 8
    assert set(seq.tolist()) <= set(text.tolist())
    pairs = [(i, j) for i in range(381) for j in range(i + 148, 381) if torch.equal(seq[i:i + 20], seq[j:j + 20])]
    assert pairs, "the passage must occur twice, at least 128 tokens apart"
    # Only the second reading counts in the loss: the rest is noise nothing can predict.
    second = pairs[0][1]
    assert weights.sum() == 20 and bool((weights[second:second + 20] == 1).all())
    tok = ByteTokenizer()
    ex = passkey_example(tok, "12345", torch.tensor(list(b"hay " * 10)))
    assert tok.decode(ex.tokens[ex.answer_start:ex.answer_end].tolist()) == "12345"
    assert tok.decode(ex.tokens[:ex.answer_start].tolist()).endswith("What is the pass key? The pass key is ")
    assert tok.decode(ex.tokens.tolist()).startswith("The pass key is 12345.")
    # In a training sequence the answer (5 digits after the question) carries recall_weight.
    seq, weights = passkey_sequence(corpus, tok, rng, 400, answer_weight=3.0, context_weight=0.5)
    heavy = (weights == 3).nonzero().flatten()
    assert heavy.numel() == 5 and float(weights.sum()) == 395 * 0.5 + 15
    assert tok.decode(seq[:int(heavy[0])].tolist()).endswith("What is the pass key? The pass key is ")
    assert tok.decode(seq[int(heavy[0]):int(heavy[-1]) + 1].tolist()).isdigit()


def test_corpus_holdout_is_the_tail(tmp_path):
    (tmp_path / "a.txt").write_text("0123456789" * 10)
    corpus = load_corpus([str(tmp_path / "a.txt")], ByteTokenizer(), 0.1)
    assert corpus.train[0].numel() == 90 and corpus.heldout[0].numel() == 10
    assert bytes(corpus.heldout[0].tolist()) == b"0123456789"


def test_shipped_training_configs_load():
    for path in sorted((REPO / "configs" / "train").glob("*.yaml")):
        load_train_config(path)


def test_bad_config_is_one_line_error(tmp_path, capsys):
    from titans_runtime.cli.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\nbatchsize: 3\n")
    assert main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "batchsize" in err and "\n" not in err
    good = REPO / "configs" / "train" / "text_mix.yaml"
    assert main(["--config", str(good), "--out", str(tmp_path / "o"), "--train", "memory,brain"]) == 2
    assert "brain" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        TrainConfig(train=["core"], steps=0).validate()


def test_non_finite_window_is_skipped(tmp_path, monkeypatch):
    """A diverged window leaves the weights and optimiser untouched and restarts the stream state."""
    import titans_runtime.training.loop as loop

    cfg = micro_setup(tmp_path, steps=4)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    real = loop.sequence_loss
    monkeypatch.setattr(loop, "sequence_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), a[2]))
    res = trainer.train_step()
    assert math.isnan(res.loss) and trainer.skipped == 1 and trainer.carried is None and trainer.step == 2
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), name
    monkeypatch.setattr(loop, "sequence_loss", real)
    assert math.isfinite(trainer.train_step().loss)


def test_cli_fine_tunes_a_model_folder_with_the_backbone_frozen(tmp_path):
    """`--init FOLDER --train memory,persistent`: the converted-LLaMA path; the backbone stays as loaded."""
    import yaml

    from titans_runtime.cli.train import main
    from titans_runtime.model.checkpoint import load_model, save_model

    cfg = micro_setup(tmp_path, steps=2)
    torch.manual_seed(5)
    save_model(TitanModel(config_from_dict(MICRO)), tmp_path / "base")
    data = cfg.to_dict()
    data.pop("model")
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(data))
    assert main(["--config", str(tmp_path / "ft.yaml"), "--out", str(tmp_path / "run"), "--init", str(tmp_path / "base"),
                 "--train", "memory,persistent", "--export", str(tmp_path / "tuned"), "--quiet"]) == 0
    base, tuned = load_model(tmp_path / "base"), load_model(tmp_path / "tuned")
    for (name, a), b in zip(base.state_dict().items(), tuned.state_dict().values()):
        assert torch.equal(a, b) == (parameter_group(name) not in ("memory", "persistent")), name


def test_config_base_merges_sections_and_replaces_other_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "corpora").mkdir()
    (tmp_path / "base.yaml").write_text(
        "model: ../tiny.yaml\nmodel_overrides: {variant: mag, memory.heads: 2}\n"
        "data: {files: [corpora], recall_weight: 8.0, passkey_share: 0.3}\noptim: {lr: 1.0e-3, warmup_steps: 5}\n"
        "steps: 50\nseed: 4\n")
    (tmp_path / "sub" / "child.yaml").write_text(
        "base: ../base.yaml\nmodel_overrides: {memory.enabled: false}\ndata: {recall_weight: 2.0}\nsteps: 10\n")
    cfg = load_train_config(tmp_path / "sub" / "child.yaml")
    assert cfg.model_overrides == {"memory.enabled": False}           # replaced whole
    assert (cfg.data.recall_weight, cfg.data.passkey_share) == (2.0, 0.3)  # merged key by key
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.seed) == (1e-3, 5, 10, 4)
    # the base's relative paths still point where the base meant them
    # a path beside the base is rebased; one the base meant from the working directory stays as written
    assert cfg.data.files == ["../corpora"] and cfg.model == "../tiny.yaml"


def test_config_base_errors_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_train_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: e.yaml\ndata: {recal_weight: 2.0}\n")
    (tmp_path / "e.yaml").write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="recal_weight"):
        load_train_config(tmp_path / "d.yaml")


def test_task_per_window_puts_one_task_in_each_window(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    corpus = load_corpus([str(tmp_path / "a.txt")], ByteTokenizer(), 0.1)
    cfg = DataConfig(synthetic_fraction=1.0, passkey_share=0.0, recall_weight=5.0, passage_min=16, passage_max=16)
    window = 128
    batches = SequenceBatches(corpus, ByteTokenizer(), cfg, 3, 4 * window + 1, 32, seed=0, pieces=4)
    tokens, weights = batches.weighted(0)
    assert tokens.shape == weights.shape == (3, 4 * window + 1)
    for row in weights:
        # one repeat per window: 16 weighted tokens (the second reading) inside each window of 128
        for w in range(4):
            heavy = (row[w * window:(w + 1) * window] == 5.0).nonzero().flatten()
            assert heavy.numel() == 16 and int(heavy[-1] - heavy[0]) == 15
    # one piece gives the whole-sequence layout: a single repeat somewhere in the sequence
    single = SequenceBatches(corpus, ByteTokenizer(), cfg, 3, 4 * window + 1, 32, seed=0).weighted(0)[1]
    assert all(int((row == 5.0).sum()) == 16 for row in single)


def test_task_span_puts_the_task_at_the_start_and_text_after_it(tmp_path):
    text = "".join(f"line {i:05d} of a text that never repeats itself exactly.\n" for i in range(600))
    (tmp_path / "a.txt").write_text(text)
    corpus = load_corpus([str(tmp_path / "a.txt")], ByteTokenizer(), 0.1)
    cfg = DataConfig(synthetic_fraction=1.0, passkey_share=0.0, recall_weight=5.0, passage_min=16, passage_max=16,
                     task_span=128)
    tokens, weights = SequenceBatches(corpus, ByteTokenizer(), cfg, 4, 513, 32, seed=0).weighted(0)
    assert tokens.shape == weights.shape == (4, 513)
    for row_tokens, row in zip(tokens, weights):
        heavy = (row == 5.0).nonzero().flatten()
        # the repeat's second reading lies inside the first 128 tokens; after them, plain text at weight 1
        assert heavy.numel() == 16 and int(heavy[-1]) < 128
        assert torch.equal(row[128:], torch.ones(385))
        first = row_tokens[:128].tolist()
        passage = row_tokens[heavy].tolist()
        assert any(first[i:i + 16] == passage for i in range(int(heavy[0]) - 16 + 1))  # read once before
        tail = bytes(row_tokens[128:].tolist()).decode()
        assert tail in text  # one contiguous stretch of the corpus
    # a span as long as the sequence or longer: the old whole-sequence layout
    whole = DataConfig(**{**cfg.__dict__, "task_span": 513})
    assert torch.equal(SequenceBatches(corpus, ByteTokenizer(), whole, 4, 513, 32, seed=0).weighted(0)[1],
                       SequenceBatches(corpus, ByteTokenizer(), DataConfig(**{**cfg.__dict__, "task_span": 0}),
                                       4, 513, 32, seed=0).weighted(0)[1])


def test_stream_plan_mixes_long_text_streams():
    plain = StreamPlan(2, 0, 0.0, seed=1)
    assert [(p.index, p.window, p.windows) for p in map(plain.at, range(5))] == [(0, 0, 2), (0, 1, 2), (1, 0, 2),
                                                                                  (1, 1, 2), (2, 0, 2)]
    plan = StreamPlan(1, 3, 0.5, seed=1)
    walked = [plan.at(step) for step in range(60)]
    assert StreamPlan(1, 3, 0.5, seed=1).at(59) == walked[59]  # a pure function of the step (resume)
    assert {p.kind for p in walked} == {MIXED, LONG_TEXT}
    expected = {MIXED: 0, LONG_TEXT: 0}
    step = 0
    while step < 57:  # sequence by sequence: every window in order, each kind numbered 0, 1, 2, ...
        first = walked[step]
        assert first.window == 0 and first.index == expected[first.kind]
        assert first.windows == (3 if first.kind == LONG_TEXT else 1)
        assert [walked[step + w].window for w in range(first.windows)] == list(range(first.windows))
        expected[first.kind] += 1
        step += first.windows


def test_long_text_streams_carry_state_reset_and_resume_exactly(tmp_path):
    cfg = micro_setup(tmp_path, steps=9, windows_per_sequence=1, long_text_windows=3, long_text_share=0.5)
    # the mixed sequences all repeats (a pass key does not fit in 33 tokens); the long ones still plain text
    cfg.data.synthetic_fraction, cfg.data.passkey_share, cfg.data.recall_weight = 1.0, 0.0, 5.0
    straight = Trainer(cfg, tmp_path / "a")
    kinds = [straight.plan.at(step) for step in range(cfg.steps)]
    assert any(p.kind == LONG_TEXT for p in kinds) and any(p.kind == MIXED for p in kinds)
    losses_a = []
    for planned in kinds:
        tokens, weights = straight.sequence_batch(planned.index, planned.kind)
        long = planned.kind == LONG_TEXT
        assert tokens.shape[1] == (3 if long else 1) * cfg.tbptt_segments * 16 + 1
        assert bool((weights == 1.0).all()) == long  # a task weights its recall tokens 5x
        losses_a.append(straight.train_step().loss)
        assert (straight.carried is None) == (planned.window == planned.windows - 1)
    middle = next(s for s, p in enumerate(kinds) if p.kind == LONG_TEXT and p.window == 1)
    first = Trainer(cfg, tmp_path / "b")
    losses_b = [r.loss for r in first.run(stop_at=middle)]  # stops inside a long stream: its state is saved
    assert first.carried is not None
    resumed = Trainer(cfg, tmp_path / "b")
    resumed.resume()
    losses_b += [r.loss for r in resumed.run()]
    assert losses_a == losses_b


def test_long_text_share_needs_long_windows(tmp_path):
    cfg = micro_setup(tmp_path, long_text_share=0.5)
    with pytest.raises(ConfigError, match="long_text_share"):
        cfg.validate()
