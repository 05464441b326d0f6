"""The loop on real prepared data: it learns, logs, evaluates, saves; accumulation and
activation checkpointing give the same numbers as their plain counterparts."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import tiny_config

from dtl import TransformerLM
from dtl.data.loader import BatchLoader
from dtl.run_dir import latest_checkpoint, list_checkpoints
from dtl.tokenizer import load_tokenizer
from dtl.train import Trainer, seed_everything, train
from dtl.train.checkpoint import load_training_state


def _metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def test_trains_logs_evaluates_and_saves(packed_data, tmp_path):
    run = tmp_path / "run"
    summary = train(
        tiny_config(
            packed_data,
            run,
            max_steps=40,
            eval_every=20,
            save_every=20,
            log_every=5,
            lr=1e-2,
            warmup_steps=4,
        )
    )
    steps, evals = _metrics(run)
    assert [r["step"] for r in steps] == list(range(5, 41, 5))
    assert {"step", "loss", "lr", "tokens_per_s", "peak_mem_mb"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5  # it learns (from ~ln 512 = 6.2)
    assert steps[0]["tokens"] == 5 * 4 * 32 and steps[0]["peak_mem_mb"] > 10
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert summary["val_loss"] == evals[-1]["val_loss"]

    # The layout other tools load: latest -> step-40, a model dir with the tokenizer.
    latest = latest_checkpoint(run)
    assert (
        latest.name == "step-40" and (run / "checkpoints" / "latest").resolve() == latest.resolve()
    )
    assert (run / "checkpoints" / "latest.txt").read_text().strip() == "step-40"
    model = TransformerLM.from_pretrained(latest)
    tok = load_tokenizer(str(latest))
    assert tok.vocab_size == model.config.vocab_size == 512
    assert load_training_state(latest)["progress"]["step"] == 40
    assert (run / "config.yaml").is_file()

    # val_loss, recomputed independently: the token-mean CE over the first 4 val batches.
    model.eval()
    total, count = 0.0, 0
    for _, batch in zip(range(4), BatchLoader(packed_data, "val", 4, shuffle=False), strict=False):
        with torch.no_grad():
            logits = model(batch["input_ids"])
        total += F.cross_entropy(
            logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((batch["targets"] != -100).sum())
    assert evals[-1]["val_loss"] == pytest.approx(total / count, rel=1e-5)


def _two_steps(data, out, **kw):
    """Losses and the gradients AdamW receives (captured by a step pre-hook) of two steps.

    Gradients, not updated weights: Adam's first step moves each weight by ~lr * sign(g), so
    a rounding-level difference in a near-zero gradient would flip a whole update."""
    trainer = Trainer(tiny_config(data, out, **kw))
    grads: list[dict[str, torch.Tensor]] = []
    names = {id(p): n for n, p in trainer.model.named_parameters()}

    def record(opt, args, kwargs):
        grads.append({names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"]})

    trainer.optimizer.register_step_pre_hook(record)
    losses = []
    for _ in range(2):
        batches = [next(iter(trainer.train_loader)) for _ in range(trainer.cfg.grad_accum)]
        losses.append(trainer.train_step(batches)[0])
        assert all(p.grad is None for p in trainer.model.parameters())  # nothing leaks
    return losses, grads, trainer.model


def _assert_same(a, b):
    losses_a, grads_a, _ = a
    losses_b, grads_b, _ = b
    assert losses_a == pytest.approx(losses_b, abs=1e-6)
    for step_a, step_b in zip(grads_a, grads_b, strict=True):
        assert step_a.keys() == step_b.keys()
        for name in step_a:
            torch.testing.assert_close(step_a[name], step_b[name], atol=1e-7, rtol=1e-4, msg=name)


def test_grad_accumulation_equals_one_big_batch_with_padding(padded_data, tmp_path):
    # Pad-mode Q&A rows score different numbers of tokens, so only token weighting is exact.
    batch = next(iter(BatchLoader(padded_data, "train", 8, seed=0)))
    counts = (batch["targets"] != -100).sum(1)
    assert counts[:4].sum() != counts[4:].sum()

    big = _two_steps(padded_data, tmp_path / "a", batch_size=8, grad_accum=1)
    acc = _two_steps(padded_data, tmp_path / "b", batch_size=4, grad_accum=2)
    _assert_same(acc, big)
    # Independently: the first loss is the token mean over all 8 rows, and the plain mean of
    # the two halves' means (what unweighted accumulation logs) is measurably different.
    seed_everything(0)
    model = TransformerLM(big[2].config).eval()  # the same initial weights (seed 0)
    with torch.no_grad():
        ce = F.cross_entropy(
            model(batch["input_ids"]).flatten(0, 1),
            batch["targets"].flatten(),
            ignore_index=-100,
            reduction="none",
        ).view(8, -1)
    token_mean = float(ce.sum() / counts.sum())
    naive = float((ce[:4].sum() / counts[:4].sum() + ce[4:].sum() / counts[4:].sum()) / 2)
    assert big[0][0] == pytest.approx(token_mean, abs=1e-5)
    assert abs(naive - token_mean) > 1e-4  # 100x the tolerance of the comparisons above


def test_activation_checkpointing_same_numbers_same_names(packed_data, tmp_path):
    plain = _two_steps(packed_data, tmp_path / "a")
    ckpt = _two_steps(packed_data, tmp_path / "b", activation_checkpointing=True)
    assert list(ckpt[2].state_dict()) == list(plain[2].state_dict())  # same names
    _assert_same(ckpt, plain)


def test_keeps_last_k_plus_best(packed_data, tmp_path):
    run = tmp_path / "run"
    # lr 0 after warmup: val loss stops improving, so the best stays an early step.
    train(
        tiny_config(
            packed_data,
            run,
            max_steps=12,
            save_every=2,
            eval_every=3,
            keep_last=2,
            lr=1e-2,
            warmup_steps=3,
            schedule="linear",
            min_lr=0.0,
        )
    )
    _, evals = _metrics(run)
    best = min(evals, key=lambda r: r["val_loss"])["step"]
    kept = [step for step, _ in list_checkpoints(run)]
    assert kept == sorted({10, 12, best})
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_bf16_autocast_on_cpu_trains(packed_data, tmp_path):
    summary = train(tiny_config(packed_data, tmp_path / "run", max_steps=3, precision="bf16"))
    assert math.isfinite(summary["val_loss"])
    steps, _ = _metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in steps)
