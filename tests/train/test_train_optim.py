"""Optimizer groups and LR schedules, checked against hand-computed values and torch's own
schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from dtl import ModelConfig, TransformerLM
from dtl.errors import DtlError
from dtl.train.optim import build_optimizer, lr_at, param_groups


def _model():
    return TransformerLM(
        ModelConfig.preset(
            "tiny", vocab_size=64, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_seq_length=8
        )
    )


def test_weight_decay_only_on_linear_weight_matrices():
    model = _model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    # Every nn.Linear weight, and nothing else, by walking the modules independently.
    linear_weights = {
        f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    }
    assert decayed == linear_weights
    assert "head.weight" in decayed and "transformer_blocks.0.attention.w_q.weight" in decayed
    assert {"embedding.weight", "ln_f.weight", "transformer_blocks.1.norm2.bias", "head.bias"} <= {
        names[id(p)] for p in no_decay["params"]
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_decay_all_is_the_plain_recipe():
    groups = param_groups(_model(), 0.1, decay_all=True)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(_model().parameters()))


def test_adamw_decoupled_decay_skips_norms():
    """One AdamW step with zero gradients: decayed weights shrink by lr*wd, norms do not move."""
    model = _model()
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["head.weight"], before["head.weight"] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(after["ln_f.weight"], before["ln_f.weight"])
    torch.testing.assert_close(after["embedding.weight"], before["embedding.weight"])


def test_warmup_then_cosine_to_the_floor():
    kw = {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 110}
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # lr * 1/10: no step runs at lr 0
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)  # halfway: (lr + min_lr) / 2
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    assert lr_at(500, **kw) == pytest.approx(1e-4)  # past the end: stays at the floor


def test_cosine_matches_torch_cosine_annealing():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=2e-4)
    for step in range(50):
        ours = lr_at(step, lr=2e-3, min_lr=2e-4, warmup_steps=0, max_steps=50)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
        opt.step()
        sched.step()


def test_linear_and_constant():
    kw = {"lr": 1.0, "min_lr": 0.0, "warmup_steps": 0, "max_steps": 4}
    assert [lr_at(s, schedule="linear", **kw) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert {lr_at(s, schedule="constant", **{**kw, "warmup_steps": 2}) for s in range(2, 9)} == {
        1.0
    }
    assert math.isclose(lr_at(0, schedule="constant", **{**kw, "warmup_steps": 2}), 0.5)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(DtlError, match="cosine, linear, constant"):
        lr_at(0, lr=1, min_lr=0, warmup_steps=0, max_steps=1, schedule="step")


def test_wsd_is_warmup_then_stable_then_linear_over_the_last_fraction():
    """lr 1e-3 -> 1e-4, 10 warmup steps, 100 steps, the last 40% decaying (the default): by
    hand."""
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100, schedule="wsd")
    want = {0: 1e-4, 5: 6e-4, 9: 1e-3, 10: 1e-3, 50: 1e-3, 60: 1e-3, 80: 5.5e-4, 90: 3.25e-4,
            99: 1.225e-4}  # fmt: skip
    for step, lr in want.items():
        assert lr_at(step, **kw) == pytest.approx(lr, rel=1e-12), step
    assert lr_at(100, **kw) == pytest.approx(1e-4)  # the floor at max_steps and after
    assert lr_at(60, **kw, decay_fraction=0.5) == pytest.approx(1e-3 - 9e-4 * 0.2)
    # A decay that would start inside the warmup starts at its end instead.
    assert lr_at(95, **{**kw, "warmup_steps": 90}) == pytest.approx(5.5e-4)


def test_wsd_and_its_fraction_are_settings_of_a_run():
    from dtl.train.clock import run_progress
    from dtl.train.config import TrainConfig, resolve_lr_schedule

    cfg = TrainConfig.from_dict(
        {
            "data": "d",
            "schedule": "wsd",
            "decay-fraction": "0.5",
            "max-steps": 100,
            "warmup-steps": 0,
            "lr": 1e-3,
            "min-lr": 0,
        }
    )
    schedule = resolve_lr_schedule(cfg, d_model=128)
    at = [schedule.at(run_progress(s, 0.0, 100, None)) for s in (49, 50, 75)]
    assert at == pytest.approx([1e-3, 1e-3, 5e-4])
    with pytest.raises(DtlError, match="--decay-fraction must be in"):
        TrainConfig(data="d", decay_fraction=0).validate()
