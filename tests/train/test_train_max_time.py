"""`dtl train --max-time MINUTES` (issue 23): a run bounded by training time, on a fake clock.

The clock is injected (`Trainer(now=...)`) and moved by the model's own forward passes: each
training step costs a fixed number of fake seconds, an evaluation batch or a checkpoint many
more (which must not count). Nothing here waits, and nothing asserts a real time.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from train_helpers import fails_here, prepared_rows, run_dtl, tiny_config, torchrun, train_argv

from dtl.run_dir import latest_checkpoint
from dtl.train import Trainer
from dtl.train.checkpoint import load_training_state
from dtl.train.clock import SCHEDULE_TICKS, run_progress
from dtl.train.config import LrSchedule, TrainConfig
from dtl.train.optim import lr_at

LR, MIN_LR = 3e-3, 3e-4  # tiny_config's lr, and its default floor (lr / 10)


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def timed_trainer(cfg, step_s=2.5, first_step_s=None, eval_s=100.0, save_s=1000.0, **kw):
    """A Trainer on a fake clock: each training forward takes `step_s` fake seconds (the
    first `first_step_s`), each evaluation batch `eval_s`, each checkpoint `save_s`."""
    clock = FakeClock()
    trainer = Trainer(cfg, now=clock, **kw)
    forward, save, calls = trainer.forward, trainer.save, []

    def timed_forward(*args, **kwargs):
        if trainer.net.training:
            first = not calls and first_step_s is not None
            clock.t += first_step_s if first else step_s
            calls.append(1)
        else:
            clock.t += eval_s
        return forward(*args, **kwargs)

    def timed_save():
        clock.t += save_s
        return save()

    trainer.forward, trainer.save = timed_forward, timed_save
    return trainer


def timed_config(data, out, **overrides):
    """tiny_config bounded by time: no step cap, no step warmup (a --max-time run's own); the
    cosine schedule, which `cosine_lr` writes out by hand."""
    settings = {"max_steps": None, "warmup_steps": None, "schedule": "cosine", **overrides}
    return tiny_config(data, out, **settings)


def cosine_lr(fraction: float, warmup: float = 0.05) -> float:
    """The lr at a share of the run, written out by hand: linear warmup over the first 5%
    (the step rule's "+1": a millionth of the budget), then cosine from LR to MIN_LR."""
    if fraction < warmup:
        return LR * (fraction + 1 / SCHEDULE_TICKS) / warmup
    t = (fraction - warmup) / (1 - warmup)
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * t))


def by_time(argv: list[str]) -> list[str]:
    """`train_argv`'s command line without its --max-steps (a run bounded by time alone)."""
    i = argv.index("--max-steps")
    return argv[:i] + argv[i + 2 :]


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def test_the_schedule_follows_the_share_of_the_budget_spent():
    schedule = LrSchedule(LR, MIN_LR, 0, None, "cosine", warmup_fraction=0.05)
    budget = 600.0  # 10 minutes
    for seconds, expected in [
        (0.0, LR / 50_000),  # the first step: the warmup's first tick, never lr 0
        (15.0, LR * 25_001 / 50_000),  # halfway through the warmup (5% of 600 s = 30 s)
        (30.0, LR),  # the warmup's end: the peak
        (315.0, (LR + MIN_LR) / 2),  # halfway through the decay
        (600.0, MIN_LR),  # the end
    ]:
        lr = schedule.at(run_progress(0, seconds, None, budget))
        assert lr == pytest.approx(expected, rel=1e-9), seconds
    linear = dataclasses.replace(schedule, schedule="linear")
    quarter = 30.0 + 0.25 * 570.0  # a quarter of the way down
    assert linear.at(run_progress(0, quarter, None, budget)) == pytest.approx(
        LR + (MIN_LR - LR) * 0.25, rel=1e-9
    )
    # With --max-steps as well, the schedule follows whichever is further along.
    assert run_progress(50, 60.0, 100, budget).fraction == 0.5
    assert run_progress(10, 450.0, 100, budget).fraction == 0.75


def test_a_run_by_steps_keeps_the_step_rule_exactly():
    """No --max-time: the schedule reads the step itself, the same floats as before."""
    schedule = LrSchedule(LR, MIN_LR, 7, 60, "cosine")
    for step in range(70):
        kw = {"lr": LR, "min_lr": MIN_LR, "warmup_steps": 7, "max_steps": 60}
        assert schedule.at(run_progress(step, 123.0, 60, None)) == lr_at(step, **kw)
    assert run_progress(60, 0.0, 60, None).finished and not run_progress(59, 0, 60, None).finished


def test_stops_when_the_budget_is_spent_then_evaluates_and_saves(packed_data, tmp_path):
    """15 s of 2.5 s steps is 6 steps, whatever evaluation (100 s a batch) and saving (1000 s)
    take; the lr of step k is the schedule's at k/6 of the budget; the end evaluates and saves
    although step 6 is on no interval."""
    run = tmp_path / "run"
    cfg = timed_config(packed_data, run, max_time=0.25, eval_every=4, save_every=4)
    summary = timed_trainer(cfg).run()
    steps, evals = records(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for k, record in enumerate(steps):  # the lr of the step taken after k steps
        assert record["lr"] == pytest.approx(cosine_lr(k / 6), rel=1e-9), k
        assert record["trained_s"] == pytest.approx(2.5 * (k + 1))
        # 128 tokens in 2.5 s: the evaluation and the save after step 4 are not in step 5's rate
        assert record["tokens_per_s"] == pytest.approx(4 * 32 / 2.5)
    assert [r["step"] for r in evals] == [4, 6]  # the interval's, then the end's
    # each evaluation records the training clock (the loss against minutes): step 4's
    # evaluation and save (1,100 s of fake time) are not in step 6's
    assert [r["trained_s"] for r in evals] == [10.0, 15.0]
    assert latest_checkpoint(run).name == "step-6"
    assert load_training_state(latest_checkpoint(run))["progress"]["trained_s"] == 15.0
    assert summary["step"] == 6 and summary["trained_s"] == 15.0
    assert summary["tokens"] == 6 * 4 * 32 and summary["val_loss"] == evals[-1]["val_loss"]


@pytest.mark.parametrize(
    ("max_steps", "stopped_at"),
    [(3, 3), (100, 6)],  # steps first; time first
)
def test_with_max_steps_too_it_stops_at_whichever_comes_first(
    packed_data, tmp_path, max_steps, stopped_at
):
    run = tmp_path / "run"
    cfg = timed_config(packed_data, run, max_time=0.25, max_steps=max_steps)
    summary = timed_trainer(cfg).run()
    steps, evals = records(run)
    assert summary["step"] == stopped_at and steps[-1]["step"] == stopped_at
    assert evals[-1]["step"] == stopped_at and latest_checkpoint(run).name == f"step-{stopped_at}"
    # The lr follows the further along of steps and time: it reaches the floor either way.
    fractions = [max(k / max_steps, 2.5 * k / 15) for k in range(stopped_at)]
    assert [r["lr"] for r in steps] == pytest.approx([cosine_lr(f) for f in fractions], rel=1e-9)


def test_a_resume_trains_what_is_left_of_the_budget(packed_data, tmp_path):
    """Stopped (Ctrl-C) after 3 of 6 steps, the run resumes at 7.5 s of 15 and goes on as if
    never stopped: the same lr, losses and end as the run that was not stopped."""
    whole = tmp_path / "whole"
    timed_trainer(timed_config(packed_data, whole, max_time=0.25)).run()

    run = tmp_path / "run"
    trainer = timed_trainer(timed_config(packed_data, run, max_time=0.25))
    step_once = trainer.train_step

    def stop_after_three(batches):  # as Ctrl-C does: the loop saves and stops after the step
        trainer._stop.requested = trainer.state.step == 2
        return step_once(batches)

    trainer.train_step = stop_after_three
    assert trainer.run()["interrupted"]
    assert load_training_state(latest_checkpoint(run))["progress"]["trained_s"] == 7.5

    resumed = timed_trainer(timed_config(packed_data, run, max_time=0.25), resume=True).run()
    assert resumed["step"] == 6 and resumed["trained_s"] == 15.0
    (one, one_eval), (two, two_eval) = records(whole), records(run)
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-6)
    assert two_eval[-1]["val_loss"] == pytest.approx(one_eval[-1]["val_loss"], abs=1e-6)


def test_a_spent_budget_is_refused_and_a_larger_one_honoured(packed_data, tmp_path, capsys):
    run = tmp_path / "run"
    timed_trainer(timed_config(packed_data, run, max_time=0.25)).run()
    argv = ["train", "--resume", str(run), "--no-progress"]
    fails_here(capsys, argv, "15 s", "--max-time 0.25", "is spent", "larger --max-time")
    assert latest_checkpoint(run).name == "step-6"  # nothing changed

    # A larger total budget: 7.5 s more, 3 more steps, the schedule at the new budget's share.
    more = timed_config(packed_data, run, max_time=0.375)
    summary = timed_trainer(more, resume=True).run()
    steps, _ = records(run)
    assert summary["step"] == 9 and summary["trained_s"] == 22.5
    assert [r["lr"] for r in steps[6:]] == pytest.approx(
        [cosine_lr(2.5 * k / 22.5) for k in (6, 7, 8)], rel=1e-9
    )


def test_the_first_lines_say_the_budget_then_the_steps_it_buys(packed_data, tmp_path, capsys):
    """A 10 s first step (warm-up) and 1 s steps after it: 60 s buy 51 steps, which the
    estimate from steps 2-6 says, and every log line projects the tokens at the end."""
    run = tmp_path / "run"
    cfg = timed_config(packed_data, run, max_time=1, log_every=10, eval_every=1000)
    summary = timed_trainer(cfg, step_s=1.0, first_step_s=10.0).run()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training ") and "training for 1 min" in lines[0]
    assert "warmup 5% of the time" in lines[0]
    assert lines[1].startswith(
        "--max-time 1 min: ~51 steps (~6.53k tokens) at 128 tokens/s "
        "(timed over steps 2-6: 1 s a step); data read ~"
    )
    assert summary["step"] == 51 and summary["tokens"] == 51 * 128  # as estimated
    logged = [line for line in lines if line.startswith("step ") and "| loss" in line]
    assert logged[1].startswith("step 20 |") and "| 128 tokens/s | 29 s of 1 min" in logged[1]
    assert all(line.endswith("~6.53k tokens by the end") for line in logged[1:])
    steps, _ = records(run)
    assert steps[1]["projected_tokens"] == 51 * 128 and steps[1]["tokens_per_s"] == 128


@pytest.mark.parametrize("value", ["0", "-1", "ten", "nan"])
def test_a_bad_max_time_is_one_line(packed_data, tmp_path, capsys, value):
    argv = by_time(train_argv(packed_data, tmp_path / "run", f"--max-time={value}"))
    fails_here(capsys, argv, "--max-time must be a positive number of minutes", repr(value))
    assert not (tmp_path / "run").exists()


def test_warmup_steps_with_max_time_is_one_line(packed_data, tmp_path, capsys):
    argv = by_time(
        train_argv(packed_data, tmp_path / "run", "--max-time", "1", "--warmup-steps", "5")
    )
    fails_here(capsys, argv, "--warmup-steps", "5% of the --max-time budget")


def test_max_steps_is_a_cap_only_when_given():
    assert TrainConfig(data="d").max_steps == 1000  # by steps: the default
    assert TrainConfig(data="d", max_time=5).max_steps is None  # by time: no step cap
    assert TrainConfig.from_dict({"data": "d", "max-time": "2.5", "max_steps": 40}).max_steps == 40


def test_the_cli_trains_for_a_time_and_says_what_it_bought(packed_data, tmp_path):
    """A real (short) --max-time run from the command line: it ends by itself, evaluated and
    saved, and its last line says the time trained and the tokens."""
    run = tmp_path / "run"
    done = run_dtl(*by_time(train_argv(packed_data, run, "--max-time", "0.02")))
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("done: step ") and "of training" in last and " tokens)" in last
    steps, evals = records(run)
    assert (
        evals[-1]["step"]
        == steps[-1]["step"]
        == load_training_state(latest_checkpoint(run))["progress"]["step"]
    )


RANKS_SCRIPT = """
import gc, json, os, sys
from dtl.train import Trainer, TrainConfig
from dtl.train import distributed

cfg = TrainConfig(**json.loads(open(sys.argv[1]).read()))
rank = distributed.setup("cpu").rank
step_s = 2.5 if rank == 0 else 7.5  # rank 1's own clock runs three times as fast


class Clock:
    t = 0.0
    def __call__(self):
        return self.t


clock = Clock()
trainer = Trainer(cfg, now=clock)
forward = trainer.forward
def timed(*args, **kwargs):
    if trainer.net.training:
        clock.t += step_s
    return forward(*args, **kwargs)
trainer.forward = timed
summary = trainer.run()
with open(f"{sys.argv[2]}.{rank}", "w") as f:
    f.write(json.dumps({"step": trainer.state.step, "trained_s": trainer.state.trained_s}))
del trainer
gc.collect()
distributed.teardown()
os._exit(0)  # as the FSDP script does: leave without torch's C++ teardown at exit
"""


def test_under_torchrun_every_rank_stops_at_rank_0s_time(packed_data, tmp_path):
    """Rank 1's clock runs 3x faster than rank 0's: both take rank 0's, so both train the
    6 steps of rank 0's 15 s (alone, rank 1 would stop after 2 and leave rank 0 waiting)."""
    cfg = timed_config(packed_data, tmp_path / "run", max_time=0.25, eval_every=4, batch_size=2)
    (tmp_path / "cfg.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (tmp_path / "ranks.py").write_text(RANKS_SCRIPT)
    torchrun(str(tmp_path / "ranks.py"), str(tmp_path / "cfg.json"), str(tmp_path / "out"))
    ranks = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert ranks == [{"step": 6, "trained_s": 15.0}] * 2
    steps, evals = records(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [4, 6]


@pytest.mark.parametrize("passes", [0.5, 3.0])
def test_a_time_run_decides_at_its_estimate_whether_it_repeats_its_data(
    corpus, tokenizer_dir, tmp_path, capsys, passes
):
    """Bounded by time alone, a run plans no steps at setup; once its first steps are timed it
    knows the tokens the budget buys (budget / 2.5 s a step x 128 tokens) and so whether it
    reads its data more than once: Muon's embedding and head then peak at 10x / 3x the lr on
    data read once, 1x on data repeated (`TrainConfig.muon_options`)."""
    small = tmp_path / "small.txt"  # a short text, so a few passes are a few dozen steps
    small.write_text(corpus.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    packed_data = prepared_rows(small, "text", 32, tokenizer_dir, tmp_path / "data")
    probe = timed_trainer(timed_config(packed_data, tmp_path / "probe", max_time=1.0))
    epoch = probe.resolved.epoch_tokens
    assert probe.resolved.repeats is None and probe.resolved.optimizer == "muon"
    steps = max(6, math.ceil(passes * epoch / 128))  # 6: the estimate comes after step 6
    cfg = timed_config(packed_data, tmp_path / "run", max_time=steps * 2.5 / 60)
    trainer = timed_trainer(cfg)
    trainer.run()
    ratios = {g["role"]: g["lr_ratio"] for g in trainer.optimizer.param_groups if "role" in g}
    repeated = steps * 128 > epoch
    assert repeated == (passes > 1)
    assert ratios["embed"] == pytest.approx(1.0 if repeated else 10.0)
    assert ratios["head"] == pytest.approx(1.0 if repeated else 3.0)
    assert f"data read ~{steps * 128 / epoch:.2g}x" in capsys.readouterr().out
