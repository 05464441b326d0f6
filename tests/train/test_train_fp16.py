"""The loop's fp16 path (autocast to float16, a GradScaler, fp32 master weights), run for real
on the CPU: PyTorch has fp16 autocast and `GradScaler("cpu")` there, and `Trainer` asks
`dtl.train.precision.resolve_precision` for its precision, so these tests patch that one function
to answer fp16-with-a-scaler on CPU. Users still get "--precision fp16 needs a GPU".

What the loop does with non-finite numbers under fp16 (and what these tests hold it to):
- inf/nan gradients with a finite loss are an fp16 overflow, the GradScaler's business: the
  step is skipped (weights and AdamW state untouched), the scale halves, training goes on, and
  --skip-nonfinite is not charged;
- unless the scale is already <= 1 (`MIN_LOSS_SCALE`): gradients that overflow unscaled are
  not an overflow any scale fixes, so that step counts as non-finite, like in fp32/bf16;
- a non-finite loss is the guard's: it stops the run, or with --skip-nonfinite N skips up to N
  such steps (no update; the scaler also sees the inf gradients and halves its scale), and
  the logged loss of a window made only of skipped steps is NaN, not 0.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from train_helpers import tiny_config, torchrun

from dtl.errors import DtlError
from dtl.run_dir import latest_checkpoint
from dtl.train import MIN_LOSS_SCALE, Trainer, precision
from dtl.train.checkpoint import load_training_state
from dtl.train.precision import Precision

FP16 = Precision("fp16", torch.float16, use_scaler=True)
INIT_SCALE = 2.0**16  # GradScaler's default


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """`precision="fp16"` on CPU resolves to fp16 autocast with an enabled GradScaler."""
    real = precision.resolve_precision

    def resolve(name, device):
        return FP16 if name == "fp16" and device.type == "cpu" else real(name, device)

    monkeypatch.setattr(precision, "resolve_precision", resolve)


def _records(run_dir, key="loss"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def _scaler_state(trainer):
    return trainer.scaler.get_scale(), trainer.scaler._get_growth_tracker()


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _capture_grads(trainer):
    """The gradients AdamW receives at each step, flattened (a step pre-hook)."""
    grads = []

    def record(opt, args, kwargs):
        grads.append(
            torch.cat([p.grad.flatten().clone() for g in opt.param_groups for p in g["params"]])
        )

    trainer.optimizer.register_step_pre_hook(record)
    return grads


def _overflow_when(trainer, armed):
    """Make one weight's gradient inf whenever `armed()` is true: a backward that overflowed."""
    weight = trainer.model.transformer_blocks[0].feed_forward.linear1.weight
    weight.register_hook(lambda g: torch.full_like(g, math.inf) if armed() else None)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _steps(trainer, n):
    """n optimizer steps through `train_step` (the loop's own step): [(loss, grad norm)]."""
    batches = iter(trainer.train_loader)
    out = []
    for _ in range(n):
        loss, norm, _ = trainer.train_step([next(batches) for _ in range(trainer.cfg.grad_accum)])
        out.append((loss, norm))
    return out


# ---------------------------------------------------------------------- it trains
def test_fp16_with_a_grad_scaler_trains_with_fp32_master_weights(
    fp16_on_cpu, packed_data, tmp_path
):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(packed_data, run, max_steps=20, precision="fp16"))
    assert trainer.prec == FP16 and trainer.scaler.is_enabled()
    assert trainer.resolved.to_config()["precision_resolved"] == "fp16"
    linear_out, grad_dtypes = set(), set()
    trainer.model.transformer_blocks[0].feed_forward.linear1.register_forward_hook(
        lambda mod, args, out: linear_out.add(out.dtype)
    )
    trainer.optimizer.register_step_pre_hook(
        lambda opt, a, k: grad_dtypes.update(
            p.grad.dtype for g in opt.param_groups for p in g["params"]
        )
    )
    summary = trainer.run()

    assert linear_out == {torch.float16}  # the matmuls really ran in fp16
    assert grad_dtypes == {torch.float32}  # the optimizer sees fp32 (unscaled) gradients
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    for state in trainer.optimizer.state.values():  # AdamW's moments, Muon's momentum
        moments = [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
        assert moments and {v.dtype for v in moments} == {torch.float32}
    losses = [r["loss"] for r in _records(run)]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3  # it learns (from ~ln 512 = 6.2)
    assert all(math.isfinite(r["grad_norm"]) for r in _records(run))
    assert math.isfinite(summary["val_loss"])
    # No step overflowed: the scale is still the initial 2^16 and every step counted as clean.
    scale, tracker = _scaler_state(trainer)
    assert scale == INIT_SCALE and math.log2(scale).is_integer() and tracker == 20
    saved = load_training_state(latest_checkpoint(run))["scaler"]
    assert saved["scale"] == INIT_SCALE and saved["_growth_tracker"] == 20


def test_fp16_losses_and_gradients_track_an_fp32_run(fp16_on_cpu, packed_data, tmp_path):
    """The oracle for "the scaler does not distort the update": the same run in fp32."""
    runs = {}
    for name in ("fp16", "fp32"):
        trainer = Trainer(tiny_config(packed_data, tmp_path / name, max_steps=20, precision=name))
        grads = _capture_grads(trainer)
        trainer.run()
        runs[name] = (_records(tmp_path / name), grads)
    (rec16, grads16), (rec32, grads32) = runs["fp16"], runs["fp32"]
    loss16, loss32 = [r["loss"] for r in rec16], [r["loss"] for r in rec32]
    assert loss16[:5] == pytest.approx(loss32[:5], rel=1e-3)
    assert loss16 == pytest.approx(loss32, abs=1e-2)
    assert loss16 != loss32  # not the fp32 path in disguise
    # Unscaled before clipping and logging: a scale left in would make these 2^16 times larger.
    norm16, norm32 = [r["grad_norm"] for r in rec16], [r["grad_norm"] for r in rec32]
    assert norm16[:5] == pytest.approx(norm32[:5], rel=5e-3)
    for step in range(3):
        assert _rel(grads16[step], grads32[step]) < 5e-3, step


def test_fp16_grad_accumulation_equals_one_big_batch(fp16_on_cpu, padded_data, tmp_path):
    # Padded Q&A rows score unequal numbers of tokens: only exact token weighting of the scaled
    # micro-batch losses agrees with the big batch.
    big = Trainer(tiny_config(padded_data, tmp_path / "big", precision="fp16", batch_size=8))
    acc = Trainer(
        tiny_config(padded_data, tmp_path / "acc", precision="fp16", batch_size=4, grad_accum=2)
    )
    ref = Trainer(tiny_config(padded_data, tmp_path / "ref", precision="fp32", batch_size=8))
    grads = {name: _capture_grads(t) for name, t in (("big", big), ("acc", acc), ("ref", ref))}
    steps = {name: _steps(t, 3) for name, t in (("big", big), ("acc", acc), ("ref", ref))}
    assert [s[0] for s in steps["acc"]] == pytest.approx([s[0] for s in steps["big"]], abs=5e-5)
    assert [s[1] for s in steps["acc"]] == pytest.approx([s[1] for s in steps["big"]], rel=2e-3)
    for step in range(3):
        assert _rel(grads["acc"][step], grads["big"][step]) < 2e-3, step
        assert _rel(grads["acc"][step], grads["ref"][step]) < 5e-3, step  # and fp32's
    assert _scaler_state(acc) == _scaler_state(big) == (INIT_SCALE, 3)


# ---------------------------------------------------------------------- overflow and the guard
def test_an_overflowing_step_is_skipped_by_the_scaler(fp16_on_cpu, packed_data, tmp_path):
    # skip_nonfinite 0: an overflow must neither stop training nor count as a bad step.
    trainer = Trainer(tiny_config(packed_data, tmp_path / "run", precision="fp16"))
    armed = False
    _overflow_when(trainer, lambda: armed)
    batches = iter(trainer.train_loader)
    for _ in range(2):
        trainer.train_step([next(batches)])
    assert _scaler_state(trainer) == (INIT_SCALE, 2)
    weights = _weights(trainer)
    adam = copy.deepcopy(trainer.optimizer.state_dict())

    armed = True
    loss, grad_norm, _ = trainer.train_step([next(batches)])
    armed = False
    assert math.isfinite(loss) and not math.isfinite(grad_norm)
    assert _same_tensors(_weights(trainer), weights)  # no update, no weight decay either
    after = trainer.optimizer.state_dict()["state"]
    for i, state in adam["state"].items():  # AdamW's moments and step count untouched
        assert _same_tensors(after[i], state), i
    assert _scaler_state(trainer) == (INIT_SCALE / 2, 0)  # halved, growth count restarted
    assert trainer.state.skipped_nonfinite == 0
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing leaks on

    loss, grad_norm, _ = trainer.train_step([next(batches)])  # the next step trains again
    assert math.isfinite(grad_norm) and not _same_tensors(_weights(trainer), weights)
    assert _scaler_state(trainer) == (INIT_SCALE / 2, 1)


def test_the_loop_logs_an_overflowing_step_and_goes_on(fp16_on_cpu, packed_data, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(packed_data, run, precision="fp16", max_steps=6))
    _overflow_when(trainer, lambda: trainer.state.step == 2)  # the third step
    summary = trainer.run()
    assert summary["step"] == 6 and not summary["interrupted"]
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)  # the loss was fine all along
    assert [math.isfinite(r["grad_norm"]) for r in records] == [True, True, False, True, True, True]
    assert trainer.state.skipped_nonfinite == 0
    assert _scaler_state(trainer) == (INIT_SCALE / 2, 3)
    assert load_training_state(latest_checkpoint(run))["scaler"]["scale"] == INIT_SCALE / 2


def _infinite_loss_when(trainer, armed):
    forward = trainer.forward
    trainer.forward = lambda *args: forward(*args) * (math.inf if armed() else 1.0)


def test_a_nonfinite_fp16_loss_is_the_guards_business(fp16_on_cpu, packed_data, tmp_path):
    cfg = tiny_config(packed_data, tmp_path / "stop", precision="fp16", max_steps=6)
    trainer = Trainer(cfg)
    _infinite_loss_when(trainer, lambda: trainer.state.step == 2)
    with pytest.raises(DtlError, match=r"loss is inf .* at step 3: stopped.*none saved yet"):
        trainer.run()

    # --skip-nonfinite 1: that step is skipped (no update), training goes on.
    run = tmp_path / "skip"
    trainer = Trainer(
        tiny_config(packed_data, run, precision="fp16", max_steps=6, skip_nonfinite=1)
    )
    _infinite_loss_when(trainer, lambda: trainer.state.step == 2)
    before = {}
    step = trainer.train_step

    def train_step(batches):
        if trainer.state.step == 2:
            before.update(_weights(trainer))
        out = step(batches)
        if trainer.state.step == 2:
            assert _same_tensors(_weights(trainer), before)
        return out

    trainer.train_step = train_step
    summary = trainer.run()
    assert before and summary["step"] == 6 and trainer.state.skipped_nonfinite == 1
    losses = [r["loss"] for r in _records(run)]
    # The step's window held no finite loss: NaN, not a perfect-looking 0.
    assert math.isnan(losses[2]) and all(math.isfinite(v) for i, v in enumerate(losses) if i != 2)
    # Its gradients were inf too, so the scaler halved its scale as for any overflow.
    assert _scaler_state(trainer) == (INIT_SCALE / 2, 3)


def test_gradients_that_overflow_at_every_scale_stop_the_run(fp16_on_cpu, packed_data, tmp_path):
    # Without the floor the scaler would skip every step forever, its scale halving towards 0,
    # while fp32 and bf16 stop at the first such step.
    assert MIN_LOSS_SCALE == 1.0
    first_bad = int(math.log2(INIT_SCALE)) + 1  # scales 2^16 .. 2^1 skip; at 2^0 it counts
    for allowed in (0, 2):
        run = tmp_path / f"run{allowed}"
        trainer = Trainer(
            tiny_config(packed_data, run, precision="fp16", max_steps=40, skip_nonfinite=allowed)
        )
        _overflow_when(trainer, lambda: True)
        with pytest.raises(DtlError, match=rf"at step {first_bad + allowed}: stopped") as err:
            trainer.run()
        assert "fp16 gradients overflow even at loss scale" in str(err.value)
        assert trainer.state.skipped_nonfinite == allowed
        assert trainer.scaler.get_scale() <= MIN_LOSS_SCALE


# ---------------------------------------------------------------------- checkpoint and resume
def _stop_after(trainer, step):
    """What Ctrl-C does: the loop saves after this step and stops."""
    train_step = trainer.train_step

    def stopping(batches):
        if trainer.state.step == step - 1:
            trainer._stop.requested = True
        return train_step(batches)

    trainer.train_step = stopping


def _losses(run_dir):
    out = {}
    for rec in _records(run_dir, key="step"):
        key = "val_loss" if "val_loss" in rec else "loss"
        out[(rec["step"], key)] = rec[key]
    return out


def test_fp16_resume_restores_the_scaler_and_continues_exactly(fp16_on_cpu, packed_data, tmp_path):
    def config(out):
        return tiny_config(
            packed_data,
            out,
            precision="fp16",
            max_steps=12,
            save_every=4,
            eval_every=4,
            eval_batches=2,
            warmup_steps=3,
            dropout=0.1,
        )

    def trainer_for(out, resume=False):
        trainer = Trainer(config(out), resume=resume)
        _overflow_when(trainer, lambda: trainer.state.step == 2)  # step 3: scale 2^15
        return trainer

    ref = trainer_for(tmp_path / "ref")
    ref.run()
    assert _scaler_state(ref) == (INIT_SCALE / 2, 9)

    run = tmp_path / "run"
    first = trainer_for(run)
    _stop_after(first, 6)
    assert first.run()["interrupted"]
    saved = load_training_state(latest_checkpoint(run))
    assert saved["progress"]["step"] == 6
    assert (saved["scaler"]["scale"], saved["scaler"]["_growth_tracker"]) == (INIT_SCALE / 2, 3)

    resumed = trainer_for(run, resume=True)
    assert _scaler_state(resumed) == (INIT_SCALE / 2, 3)  # restored, not a fresh 2^16, 0
    assert resumed.run()["step"] == 12
    assert _scaler_state(resumed) == _scaler_state(ref)
    ref_losses = _losses(tmp_path / "ref")
    assert len(ref_losses) == 12 + 3
    assert _losses(run) == ref_losses  # every train and val loss, bit for bit


def test_resume_may_switch_between_fp16_and_a_precision_without_scaler(
    fp16_on_cpu, packed_data, tmp_path
):
    # An fp32/bf16 checkpoint holds an empty scaler state (a disabled GradScaler's): an fp16
    # resume of it (say on another machine, with --precision auto) starts a fresh scaler.
    run = tmp_path / "run"
    Trainer(tiny_config(packed_data, run, max_steps=2, precision="fp32")).run()
    assert load_training_state(latest_checkpoint(run))["scaler"] == {}
    resumed = Trainer(tiny_config(packed_data, run, max_steps=4, precision="fp16"), resume=True)
    assert resumed.scaler.is_enabled() and _scaler_state(resumed) == (INIT_SCALE, 0)
    assert resumed.run()["step"] == 4
    assert _scaler_state(resumed) == (INIT_SCALE, 2)
    # And back: an fp32 resume of an fp16 checkpoint ignores its scaler state.
    back = Trainer(tiny_config(packed_data, run, max_steps=6, precision="fp32"), resume=True)
    assert not back.scaler.is_enabled() and back.run()["step"] == 6
    assert all(math.isfinite(r["loss"]) for r in _records(run))


# ---------------------------------------------------------------------- FSDP
FSDP_SCRIPT = """
import dataclasses, json, math, os, sys
import torch
from dtl.train import distributed, precision
from dtl.train import Trainer, TrainConfig

FP16 = precision.Precision("fp16", torch.float16, use_scaler=True)
real = precision.resolve_precision
precision.resolve_precision = lambda name, dev: FP16 if name == "fp16" else real(name, dev)
settings, results = json.loads(open(sys.argv[1]).read()), sys.argv[2]
tr = Trainer(TrainConfig(**settings))
rank = tr.dist.rank
linear = tr.model.transformer_blocks[0].feed_forward.linear2
hooked = set()


def poison(g):  # step 2, rank 0 only: one entry of its (unsharded, pre-reduction) gradient
    if tr.state.step != 1 or rank != 0:
        return None
    g = g.clone()
    g.view(-1)[0] = math.inf
    return g


def pre_forward(mod, args):  # FSDP2 hands the block its unsharded weight for the forward
    if id(mod.weight) not in hooked and mod.weight.requires_grad:
        hooked.add(id(mod.weight))
        mod.weight.register_hook(poison)


linear.register_forward_pre_hook(pre_forward)
unscale, shard_finite = tr.scaler.unscale_, []


def unscale_(opt):
    shard_finite.append(bool(torch.isfinite(linear.weight.grad.to_local()).all()))
    return unscale(opt)


tr.scaler.unscale_ = unscale_
local = lambda: [p.detach().to_local().clone() for p in tr.model.parameters()]
batches, out = iter(tr.train_loader), []
for _ in range(3):
    before = local()
    loss, norm, _ = tr.train_step([next(batches)])
    tr.state.step += 1
    out.append({"loss": loss, "finite": math.isfinite(norm), "scale": tr.scaler.get_scale(),
                "changed": sum(not torch.equal(a, b) for a, b in zip(before, local())),
                "shard_finite": shard_finite[-1]})
with open(f"{results}.{rank}", "w") as f:
    f.write(json.dumps(out))
distributed.teardown()
# About 1 run in 5 here, torch aborts in its C++ teardown at interpreter exit ("terminate called
# without an active exception", no Python frame), after both ranks wrote their results. That is
# torch's exit path, not the behaviour under test, so leave without running it.
os._exit(0)
"""


def test_fsdp_ranks_skip_an_overflow_together(fp16_on_cpu, packed_data, tmp_path):
    """Under FSDP each rank unscales only its shard of the gradients: an overflow that lands
    in one rank's shard must still skip the step (and halve the scale) on every rank."""
    import dataclasses

    cfg = tiny_config(packed_data, tmp_path / "run", precision="fp16", fsdp=True, batch_size=2)
    (tmp_path / "cfg.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (tmp_path / "fsdp_fp16.py").write_text(FSDP_SCRIPT)
    torchrun(str(tmp_path / "fsdp_fp16.py"), str(tmp_path / "cfg.json"), str(tmp_path / "out"))
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    n_params = len(list(Trainer(tiny_config(packed_data, tmp_path / "x")).model.parameters()))
    # Step 2: the inf sits in rank 0's shard only; rank 1's own shard is finite.
    assert [s["shard_finite"] for s in ranks[0]] == [True, False, True]
    assert [s["shard_finite"] for s in ranks[1]] == [True, True, True]
    for steps in ranks:
        assert [s["finite"] for s in steps] == [True, False, True]  # the norm is global
        assert [s["changed"] for s in steps] == [n_params, 0, n_params]  # both skipped step 2
        assert [s["scale"] for s in steps] == [INIT_SCALE, INIT_SCALE / 2, INIT_SCALE / 2]
    assert [s["loss"] for s in ranks[0]] == [s["loss"] for s in ranks[1]]
