"""Muon (--optimizer muon): Newton–Schulz against torch.linalg.svd, one step against the
definition worked by hand, the AdamW half against torch's AdamW, exact resume on the CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from train_helpers import fails_here, tiny_config, train_argv

from dtl import ModelConfig, TransformerLM
from dtl.run_dir import latest_checkpoint
from dtl.train import train
from dtl.train.config import build_config
from dtl.train.muon import Muon, build_muon, newton_schulz
from dtl.train.optim import set_lr


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 48)])
def test_newton_schulz_pushes_singular_values_near_one_keeping_the_directions(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 30  # one direction far stronger than the rest: plain SGD would follow it alone
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    x = newton_schulz(g)
    assert x.shape == g.shape and x.dtype == torch.float32
    sx = torch.linalg.svdvals(x)
    # The quintic's published behaviour: every singular value lands in about [0.7, 1.2].
    assert sx.min() > 0.6 and sx.max() < 1.25, sx
    assert s.max() / s.min() > 30  # the input was far from orthogonal
    # Same singular vectors as g: U.T @ X @ V is diagonal (off-diagonal mass ~0).
    core = u.T @ x @ vh.T
    off = core - torch.diag(torch.diagonal(core))
    assert off.norm() / core.norm() < 1e-3
    cosine = (x * (u @ vh)).sum() / (x.norm() * (u @ vh).norm())
    assert cosine > 0.97


def _model():
    cfg = ModelConfig.preset(
        "tiny", vocab_size=50, d_model=16, n_heads=2, n_layers=2, d_ff=48, max_seq_length=8
    )
    return TransformerLM(cfg)


def test_muon_takes_the_blocks_matrices_adamw_the_rest():
    model = _model()
    opt = build_muon(model, lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_group, head_group, embed_group, rest = opt.param_groups
    assert muon_group["use_muon"] and not head_group["use_muon"] and not rest["use_muon"]
    muon_names = {names[id(p)] for p in muon_group["params"]}
    want = {
        f"transformer_blocks.{i}.{m}.weight"
        for i in range(2)
        for m in ("attention.w_q", "attention.w_k", "attention.w_v", "attention.w_o")
        + ("feed_forward.linear1", "feed_forward.linear2")
    }
    assert muon_names == want
    assert {names[id(p)] for p in head_group["params"]} == {"head.weight"}
    assert head_group["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert {names[id(p)] for p in embed_group["params"]} == {"embedding.weight"}
    assert embed_group["weight_decay"] == 0.0
    assert {"head.bias", "ln_f.weight", "transformer_blocks.0.norm1.bias"} <= {
        names[id(p)] for p in rest["params"]
    }
    # The schedule's value times lr_ratio: Muon's group peaks at muon_lr.
    set_lr(opt, 1e-3)
    assert muon_group["lr"] == pytest.approx(0.02) and head_group["lr"] == pytest.approx(1e-3)


def test_each_group_peaks_at_its_own_lr_on_the_one_schedule():
    """--embed-lr / --head-lr / --scalar-lr / --muon-lr: at a schedule value of half the
    peak --lr, each group runs at half its own peak (by hand)."""
    opt = build_muon(_model(), lr=1e-3, muon_lr=0.02, embed_lr=5e-3, head_lr=2e-3, scalar_lr=4e-3)
    set_lr(opt, 5e-4)
    lrs = [g["lr"] for g in opt.param_groups]  # muon, head, embedding, scalars
    assert lrs == pytest.approx([0.01, 1e-3, 2.5e-3, 2e-3])
    default = build_muon(_model(), lr=1e-3, muon_lr=0.02)  # None: every AdamW group at --lr
    set_lr(default, 5e-4)
    assert [g["lr"] for g in default.param_groups] == pytest.approx([0.01, 5e-4, 5e-4, 5e-4])


def test_momentum_warms_up_from_start_to_momentum_by_hand():
    """momentum_start 0.8 -> 0.95 over 3 updates: 0.8, 0.85, 0.9, then 0.95 for good."""
    from dtl.train.muon import momentum_at

    assert [momentum_at(s, 0.95, 0.8, 3) for s in range(5)] == pytest.approx(
        [0.8, 0.85, 0.9, 0.95, 0.95]
    )
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(6, 6, generator=gen)
    grads = [torch.randn(6, 6, generator=gen) for _ in range(4)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon(
        [{"params": [p], "use_muon": True, "momentum_start": 0.8, "momentum_warmup": 3}],
        lr=0.05,
        momentum=0.95,
    )
    for g in grads:
        p.grad = g.clone()
        opt.step()
    w, b = w0, torch.zeros(6, 6)
    for g, mu in zip(grads, (0.8, 0.85, 0.9, 0.95), strict=True):  # B <- mu B + G, U = G + mu B
        b = mu * b + g
        w = w - 0.05 * newton_schulz(g + mu * b)
    torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=1e-5)


def test_two_muon_steps_match_the_definition_by_hand():
    """Nesterov momentum, orthogonalise, scale by sqrt(max(1, out/in)), decoupled decay."""
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(12, 4, generator=gen)  # tall: out/in = 3, scale sqrt(3)
    g1, g2 = torch.randn(12, 4, generator=gen), torch.randn(12, 4, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    lr, mu, wd = 0.05, 0.9, 0.1
    opt = Muon([{"params": [p], "use_muon": True}], lr=lr, momentum=mu, weight_decay=wd)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    # By hand: B1 = g1, U1 = g1 + mu*B1; B2 = mu*B1 + g2, U2 = g2 + mu*B2.
    b1 = g1
    w1 = w0 * (1 - lr * wd) - lr * math.sqrt(3) * newton_schulz(g1 + mu * b1)
    b2 = mu * b1 + g2
    w2 = w1 * (1 - lr * wd) - lr * math.sqrt(3) * newton_schulz(g2 + mu * b2)
    torch.testing.assert_close(p.detach(), w2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], b2)


def test_the_adamw_groups_match_torch_adamw():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, generator=gen)
    ours, ref = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = Muon([{"params": [ours], "weight_decay": 0.1}], lr=0.01, betas=(0.9, 0.95))
    torch_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(5, 3, generator=gen)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-6, rtol=1e-5)


def _quintic_by_hand(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The published iteration written out for one matrix (Keller Jordan's coefficients):
    X = G / |G|_F, on the wide form; X <- a X + (b A + c A A) X with A = X X^T."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_batched_newton_schulz_equals_each_matrix_alone():
    """The matrices of one shape are orthogonalised as one stack: each result is what the
    iteration written out for that matrix alone gives (tall ones iterated as their
    transpose); `newton_schulz` of one matrix too."""
    from dtl.train.muon import newton_schulz_batched

    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 16), (48, 16), (16, 48), (16, 16), (48, 16), (8, 24)]
    mats = [torch.randn(*s, generator=gen) * (i + 1) for i, s in enumerate(shapes)]
    got = newton_schulz_batched(mats)
    assert [tuple(x.shape) for x in got] == shapes
    for m, x in zip(mats, got, strict=True):
        torch.testing.assert_close(x, _quintic_by_hand(m), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(newton_schulz(m), _quintic_by_hand(m), atol=2e-5, rtol=1e-4)


def test_the_adamw_groups_are_torch_fused_adamw_to_the_bit():
    """Muon's AdamW groups (several tensors, decayed and not) step exactly as
    torch.optim.AdamW(fused=True) does: one kernel over each group's tensors."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(300, 8), (5, 3), (7,), (2, 2)]
    ws = [torch.randn(*s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(w.clone()) for w in ws]
    ref = [torch.nn.Parameter(w.clone()) for w in ws]

    def groups(ps: list) -> list[dict]:
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    opt = Muon(groups(ours), lr=0.01, betas=(0.9, 0.95))
    torch_opt = torch.optim.AdamW(groups(ref), lr=0.01, betas=(0.9, 0.95), fused=True)
    for _ in range(6):
        for a, b in zip(ours, ref, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_bf16_newton_schulz_returns_the_matrices_dtype_within_bf16_rounding():
    """dtype=bf16: the iteration in bf16, the result back in fp32, near the fp32 iteration's
    (bf16 keeps ~3 significant digits; the singular values stay near 1 either way)."""
    from dtl.train.muon import newton_schulz_batched

    gen = torch.Generator().manual_seed(5)
    mats = [torch.randn(16, 48, generator=gen), torch.randn(48, 16, generator=gen)]
    for m, low in zip(mats, newton_schulz_batched(mats, dtype=torch.bfloat16), strict=True):
        assert low.dtype == torch.float32 and low.shape == m.shape
        torch.testing.assert_close(low, newton_schulz(m), atol=0.05, rtol=0.05)
        s = torch.linalg.svdvals(low)
        assert 0.6 < float(s.min()) and float(s.max()) < 1.3


@pytest.mark.parametrize(("precision", "ns_dtype"), [("bf16", torch.bfloat16), ("fp32", None)])
def test_a_bf16_run_orthogonalises_in_bf16_an_fp32_run_in_fp32(
    packed_data, tmp_path, precision, ns_dtype
):
    """The run's precision sets Muon's Newton–Schulz dtype: fp32 stays exact fp32."""
    from dtl.train import Trainer

    cfg = tiny_config(packed_data, tmp_path, optimizer="muon", precision=precision, max_steps=1)
    assert Trainer(cfg).optimizer.ns_dtype == ns_dtype


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators dispatched inside it (each one is a Python -> C++ round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(n_layers: int) -> tuple[int, int]:
    """(operators dispatched by the second Muon step of a tiny model, its parameter count)."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100, n_layers=n_layers))
    opt = build_muon(model, lr=1e-3)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        count = _CountOps()
        with count:
            opt.step()
    return count.n, len(list(model.parameters()))


def test_a_step_works_on_all_tensors_at_once_not_one_by_one():
    """The optimizer's cost in Python does not grow with the model's depth: twice the layers
    (32 more tensors) add fewer operators than tensors (fused AdamW, foreach momentum, the
    matrices of one shape orthogonalised as one stack), not ~25 per tensor."""
    small, small_params = _ops_per_step(2)
    deep, deep_params = _ops_per_step(4)
    assert deep - small < deep_params - small_params


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]


def test_muon_run_resumed_is_bit_identical_to_one_run(packed_data, tmp_path):
    """8 steps in one go == 4 steps, --resume, 4 more: every loss and weight to the bit."""
    common = {"optimizer": "muon", "schedule": "constant", "dropout": 0.1, "max_steps": 8}
    train(tiny_config(packed_data, tmp_path / "one", save_every=8, **common))
    train(tiny_config(packed_data, tmp_path / "two", save_every=4, **{**common, "max_steps": 4}))
    resumed = build_config({"max_steps": 8}, resume=str(tmp_path / "two"))
    train(resumed, resume=True)
    assert _losses(tmp_path / "one") == _losses(tmp_path / "two")
    assert len(_losses(tmp_path / "one")) == 8
    one = TransformerLM.from_pretrained(latest_checkpoint(tmp_path / "one")).state_dict()
    two = TransformerLM.from_pretrained(latest_checkpoint(tmp_path / "two")).state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    # It trained: Muon moved the block matrices.
    assert _losses(tmp_path / "one")[-1] < _losses(tmp_path / "one")[0]


def test_the_resolved_lr_and_warmup_are_shown_saved_and_used(packed_data, tmp_path, capsys):
    """d_model 32, 6 steps, no --lr/--warmup-steps: lr 1e-3 * sqrt(128 / 32) = 2e-3 and
    warmup max(1, round(0.3)) = 1 step, so step 1 already runs at the peak."""
    cfg = tiny_config(packed_data, tmp_path / "run", lr=None, warmup_steps=None)
    train(cfg)
    first = next(line for line in capsys.readouterr().out.splitlines() if "training" in line)
    # The defaults of a run that reads its data once (--optimizer auto: muon), by hand:
    # embedding 10 x 2e-3, head 3 x 2e-3 (EMBED_LR_RATIO, HEAD_LR_RATIO), wsd to lr / 10.
    want = "adamw lr 0.002, muon lr 0.02, embedding lr 0.02, head lr 0.006, warmup 1 steps, wsd"
    assert f"{want} to 0.0002; 1% of the data read: muon (auto), the data's rows (auto)" in first
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] is None and saved["warmup_steps"] is None  # as given: the rule
    assert saved["lr_resolved"] == pytest.approx(2e-3)
    assert saved["warmup_steps_resolved"] == 1
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[0]["lr"] == pytest.approx(2e-3)


def test_an_unknown_optimizer_is_one_clear_line(packed_data, tmp_path, capsys):
    argv = train_argv(packed_data, tmp_path / "run", optimizer="sgd")
    fails_here(capsys, argv, "unknown --optimizer 'sgd'; choose adamw, muon")
    assert not (tmp_path / "run").exists()


def test_a_new_muon_lr_at_resume_is_the_one_used(packed_data, tmp_path):
    from dtl.train import Trainer

    train(tiny_config(packed_data, tmp_path / "run", optimizer="muon", save_every=6))
    cfg = build_config({"max_steps": 8, "muon_lr": 0.01}, resume=str(tmp_path / "run"))
    trainer = Trainer(cfg, resume=True)
    assert trainer.state.step == 6  # the saved state was loaded
    muon_group = trainer.optimizer.param_groups[0]
    assert muon_group["use_muon"] and muon_group["lr_ratio"] == pytest.approx(0.01 / 3e-3)
