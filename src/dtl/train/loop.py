"""The training loop of `dtl train`: data -> forward -> loss -> backward -> AdamW, with logs.

One optimizer step reads `grad_accum` micro-batches of `batch_size` rows of `seq_len` tokens
on each of the `world_size` ranks. Each micro-batch's mean loss is weighted by its share of
the window's scored tokens, so the accumulated gradient is exactly that of one big batch
(padding and masked tokens included), and gradients are zeroed after every step, so a partial
window never leaks into the next one.

A run ends at `--max-steps`, or after `--max-time` minutes on the training clock (`clock`:
evaluation and saving not counted), whichever comes first; the lr schedule reads the same
progress (`clock.run_progress`), and the last step evaluates and saves either way.

The pieces beside the loop: `config` (settings), `setup` (run dir, data, model config),
`parallelize` (DDP/FSDP, compile), `optim`, `precision`, `checkpoint`, `metrics`, `clock`.

>>> from dtl.train import TrainConfig, train
>>> summary = train(TrainConfig(data="data/wiki", out="runs/tiny", preset="tiny",
...                             max_steps=200))  # doctest: +SKIP
>>> summary["val_ppl"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dtl.data.loader import BatchLoader
from dtl.data.shards import data_fingerprint
from dtl.errors import DtlError
from dtl.fileio import disk_full_as_error
from dtl.model.config import ModelConfig
from dtl.model.transformer import TransformerLM
from dtl.run_dir import ResumeFrom, latest_checkpoint, set_aside_newer
from dtl.train import checkpoint as ckpt
from dtl.train import distributed, optim, precision
from dtl.train.clock import Progress, TrainClock, run_progress
from dtl.train.config import TrainConfig, minutes, repeats_data
from dtl.train.init_from import load_init_weights
from dtl.train.interrupt import StopFlag
from dtl.train.memory import is_oom, oom_advice
from dtl.train.metrics import MetricsLog, peak_mem_mb
from dtl.train.muon import set_peak_lrs
from dtl.train.parallelize import (
    full_model,
    load_full_model,
    load_optimizer_state_dict,
    optimizer_state_dict,
    parallelize,
)
from dtl.train.setup import RunSetup, setup_run
from dtl.train.step import Batch, clip_gradients, evaluate_batches, forward_backward

# fp16: a step whose gradients overflow at a loss scale this low is not the GradScaler's to
# skip (scaling down cannot help): it counts as non-finite, so the guard stops a run that the
# scaler would otherwise skip forever, its scale halving towards 0.
MIN_LOSS_SCALE = 1.0
# A --max-time run estimates the steps its budget buys from the steps after a launch's first
# (which pays for warm-up or compile): this many of them, then one log line says it.
ESTIMATE_AFTER_STEPS = 5


@dataclass
class _State:
    """What changes step by step (saved in training_state.pt with the optimizer etc.)."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    skipped_nonfinite: int = 0
    window_loss: float = 0.0  # sum of step losses since the last log line
    window_steps: int = 0
    trained_s: float = 0.0  # seconds on the training clock (what --max-time counts)


class Trainer:
    """The pieces of one run; `run()` is the loop, `train_step` one optimizer step.

    Everything is built from `setup.run`, the run's resolved record: `setup` is
    `setup_run(cfg, resume)`, made here unless given (`train()` makes it first).

    `now` is the training clock's time source (a monotonic clock in seconds; tests give a
    fake one to run a --max-time run without waiting).

    >>> trainer = Trainer(TrainConfig(data="data/wiki", out="runs/tiny"))  # doctest: +SKIP
    >>> loss, grad_norm, stop = trainer.train_step([next(trainer.train_loader)])  # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: TrainConfig | None = None,
        resume: ResumeFrom | bool | None = None,
        setup: RunSetup | None = None,
        now: Callable[[], float] = time.perf_counter,
    ) -> None:
        if setup is None:
            if cfg is None:
                raise TypeError("Trainer needs a TrainConfig or a RunSetup")
            setup = setup_run(cfg, resume)
        self.setup, self.resolved = setup, setup.run
        self.cfg = setup.run.cfg  # the run's settings, not the caller's object
        self.dist, self.device, self.prec = setup.dist, setup.device, setup.prec
        self.run_dir, self.tokenizer = setup.run.run_dir, setup.tokenizer
        self._build_model()
        self._build_loaders()
        # The tokens this run reads, recorded in every checkpoint: a resume on other data
        # (re-prepared in another order, or edited) is refused, not trained on silently.
        self.data_fingerprint = data_fingerprint(setup.run.data_dir)
        self.state = _State()
        self._now = now
        self.clock = TrainClock(now=now)  # replaced when the loop starts (a resume's time)
        self._stop = StopFlag()
        self.metrics = MetricsLog(self.run_dir, self.dist.is_main, tensorboard=self.cfg.tensorboard)
        if setup.run.resume is not None:
            self._load_latest()
        elif self.dist.is_main:
            self.setup.save_config()
            self.metrics.start()

    @property
    def model_config(self) -> ModelConfig:
        return self.resolved.model

    @property
    def seq_len(self) -> int:
        return self.resolved.seq_len

    def _build_model(self) -> None:
        """The model (the same initial weights on every rank), its wrapping, the optimizer."""
        cfg = self.cfg
        ckpt.seed_everything(cfg.seed)
        self.model = TransformerLM(self.resolved.model).to(self.device)
        if self.setup.init is not None:  # --init-from: its weights; the optimizer stays fresh
            load_init_weights(self.model, self.setup.init)
        if self.dist.rank > 0:  # its own dropout masks per rank
            ckpt.seed_everything(cfg.seed + 7919 * self.dist.rank)
        # bf16 on a CPU: the forward runs bf16 copies of the weights; `self.model` stays the
        # fp32 master that the optimizer updates and the checkpoints hold
        self.copies = precision.WeightCopies(self.model) if self.prec.weight_copies else None
        compute = self.model if self.copies is None else self.copies.model
        self.net, self.forward = parallelize(compute, cfg, self.dist)
        self.optimizer = optim.make_optimizer(
            self.model,
            self.resolved.optimizer,
            lr=self.resolved.schedule.lr,
            muon_lr=cfg.muon_lr,
            weight_decay=cfg.weight_decay,
            betas=(cfg.beta1, cfg.beta2),
            decay_all=cfg.decay_all,
            muon_options=cfg.muon_options(self.resolved.schedule.lr, self.resolved.repeats),
            precision=self.prec.name,
        )
        self.scaler = precision.grad_scaler(self.prec, self.device)

    def _build_loaders(self) -> None:
        """Batches of (batch_size, seq_len): the train split's shuffled, the val split's fixed."""
        kw = {"rank": self.dist.rank, "world_size": self.dist.world_size, "seq_len": self.seq_len}
        data_dir, batch_size = self.resolved.data_dir, self.cfg.batch_size
        offsets = self.resolved.data_order == "offsets"  # a resume keeps the saved order
        self.train_loader = BatchLoader(
            data_dir, "train", batch_size, seed=self.cfg.seed, offsets=offsets, **kw
        )
        # A fresh val loader per evaluation: every pass reads the same first batches.
        self._val_loader = functools.partial(
            BatchLoader, data_dir, "val", batch_size, shuffle=False, **kw
        )
        self._val_loader()  # an empty val split fails now, not at the first evaluation

    # ------------------------------------------------------------------ one step
    def train_step(self, batches: list[Batch]) -> tuple[float, float, bool]:
        """One optimizer step over the micro-batches; returns (loss, grad norm, stop flag)."""
        step_loss, stop = forward_backward(
            self.forward, self.net, batches, self.prec, self.scaler, self.dist, self._stop.requested
        )
        if self.copies is not None:
            self.copies.grads_to_master()  # in fp32, where the optimizer and clipping see them
        grad_norm = clip_gradients(self.optimizer, self.scaler, self.cfg.grad_clip)
        # A non-finite loss is the guard's business. Non-finite gradients under a finite loss
        # are the GradScaler's (fp16): it skips the step and halves the scale, unless the scale
        # is already <= 1, where the gradients overflow unscaled and no scale can fix them.
        note = ""
        bad = not math.isfinite(step_loss)
        if not bad and not math.isfinite(grad_norm):
            if not self.prec.use_scaler:
                bad = True
            elif (scale := self.scaler.get_scale()) <= MIN_LOSS_SCALE:
                bad, note = True, f"; fp16 gradients overflow even at loss scale {scale:g}"
        if bad:
            self._nonfinite(step_loss, grad_norm, note)
        else:
            self.scaler.step(self.optimizer)  # skips the update itself if fp16 grads overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # no partial window leaks into the next step
        if self.copies is not None:
            self.copies.refresh()  # the next forward's weights: the updated masters, rounded
        return step_loss, grad_norm, stop

    def _nonfinite(self, loss: float, grad_norm: float, note: str = "") -> None:
        step, allowed = self.state.step + 1, self.cfg.skip_nonfinite
        if self.state.skipped_nonfinite < allowed:
            self.state.skipped_nonfinite += 1
            self.metrics.print(
                f"step {step}: non-finite loss {loss} / grad norm {grad_norm}{note}; skipped "
                f"({self.state.skipped_nonfinite} of --skip-nonfinite {allowed})"
            )
            return
        last = latest_checkpoint(self.run_dir)
        raise DtlError(
            f"loss is {loss} (grad norm {grad_norm}{note}) at step {step}: stopped instead of training "
            f"on garbage; last good checkpoint: {last if last else 'none saved yet'}. Lower --lr, "
            "use --precision fp32 or bf16, or allow a few skips with --skip-nonfinite N (fp16)"
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss over the first `eval_batches` val batches (a fixed set)."""
        loader = self._val_loader()
        n_batches = max(1, min(self.cfg.eval_batches, int(loader.batches_per_epoch)))
        batches = (batch for _, batch in zip(range(n_batches), loader, strict=False))
        return evaluate_batches(self.forward, self.net, batches, self.prec, self.dist)

    # ------------------------------------------------------------------ save and resume
    def save(self) -> Path | None:
        """A checkpoint of the current step (collective under FSDP; rank 0 writes)."""
        optimizer_state = optimizer_state_dict(self.net, self.optimizer, fsdp=self.cfg.fsdp)
        model = full_model(self.net, self.model, self.dist, fsdp=self.cfg.fsdp)
        rng_ranks = distributed.gather_objects(ckpt.rng_state(), self.dist)  # every rank's RNG
        path = None
        if self.dist.is_main:
            state = {
                "progress": dataclasses.asdict(self.state),
                "optimizer": optimizer_state,
                "scheduler": {"schedule": self.cfg.schedule, "step": self.state.step},
                "scaler": self.scaler.state_dict(),
                "loader": self.train_loader.state_dict(),
                "rng": rng_ranks[0],
                "rng_ranks": rng_ranks if self.dist.enabled else None,
                "world_size": self.dist.world_size,
                "data_fingerprint": self.data_fingerprint,
            }
            keep = (self.state.best_step,) if self.state.best_step >= 0 else ()
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.state.step,
                model,
                state,
                tokenizer=self.tokenizer,
                keep_last=self.cfg.keep_last,
                keep=keep,
            )
        distributed.barrier(self.dist)
        return path

    def _load_latest(self) -> None:
        """Continue from the run's newest checkpoint: weights, optimizer, scaler, data
        position, progress and every RNG, so the run goes on as if never stopped."""
        path, state = ckpt.load_latest(
            self.resolved.resume, self.resolved.model, self.dist.world_size
        )
        self._check_same_data(path, state)
        load_full_model(self.net, self.model, path, self.device, fsdp=self.cfg.fsdp)
        if self.copies is not None:
            self.copies.refresh()
        ratios = [g.get("lr_ratio") for g in self.optimizer.param_groups]
        load_optimizer_state_dict(self.net, self.optimizer, state["optimizer"], fsdp=self.cfg.fsdp)
        for group, ratio in zip(self.optimizer.param_groups, ratios, strict=True):
            if ratio is not None:  # this launch's --muon-lr / --lr, not the saved run's
                group["lr_ratio"] = ratio
        if state["scaler"]:  # empty when saved without a scaler (fp32/bf16): start a fresh one
            self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["loader"])
        self.state = _State(**state["progress"])  # trained_s: 0 in checkpoints from before it
        self._check_budget_left(path)
        ranks = state.get("rng_ranks")
        ckpt.set_rng_state(ranks[self.dist.rank] if ranks else state["rng"])
        if self.dist.is_main:
            # From an older checkpoint the run goes on from there: the newer checkpoints (a
            # future this run replaces) are kept aside, not pruned or mixed into `latest`.
            aside = set_aside_newer(self.run_dir, self.state.step)
            self.setup.save_config()
            self.metrics.truncate_after(self.state.step)
            print(f"resuming {self.run_dir} from {path.name}", flush=True)
            if aside is not None:
                print(
                    f"the checkpoints after {path.name} (and their metrics) were moved to "
                    f"{aside}; this run continues from step {self.state.step}",
                    flush=True,
                )
        distributed.barrier(self.dist)

    def _check_budget_left(self, path: Path) -> None:
        """A resumed --max-time run trains what is left of its budget (the time trained is
        in the checkpoint); one with nothing left is refused, not evaluated and saved again."""
        budget, trained = self.resolved.budget_s, self.state.trained_s
        if budget is None or trained < budget:
            return
        raise DtlError(
            f"{self.run_dir} has trained {minutes(trained)} by {path.name}: its --max-time "
            f"{self.cfg.max_time:g} (minutes) is spent. Continue with a larger --max-time (the "
            f"total, e.g. --max-time {2 * self.cfg.max_time:g}) or start a new --out"
        )

    def _check_same_data(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse to resume on data other than the checkpoint's (unless --no-data-check);
        checkpoints written before fingerprints were recorded are not checked."""
        saved = state.get("data_fingerprint")
        if saved is None or saved == self.data_fingerprint:
            return
        if not self.cfg.data_check:
            self.metrics.print(
                f"warning: {self.resolved.data_dir} is not the data {path.name} was trained on "
                "(--no-data-check): continuing on the new data"
            )
            return
        raise DtlError(
            f"cannot resume {self.run_dir}: the data dir {self.resolved.data_dir} has changed since "
            f"{path.name} was saved (its shards' fingerprint differs: re-prepared in another "
            "order, or other text); resume with the data the run was trained on, start a new "
            "--out, or pass --no-data-check to continue on the new data"
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Train to `max_steps` or for `max_time` minutes, whichever comes first (or until
        Ctrl-C, which saves first); the run's summary."""
        with self._stop:
            try:
                return self._loop()
            finally:
                self.metrics.close()

    def _loop(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        bar = tqdm(
            total=cfg.max_steps,
            initial=st.step,
            unit="step",
            dynamic_ncols=True,
            # a bar only on a terminal: `dtl train ... > log 2>&1` gets the log lines alone
            disable=not (cfg.progress and self.dist.is_main and sys.stderr.isatty()),
        )
        self.net.train()
        batches = iter(self.train_loader)
        last_save_step, stop = None, False
        run = self.resolved
        if st.step == 0 and self.setup.init is not None:
            self.metrics.print(
                f"starting from the weights of {run.init_from} (fresh optimizer, step 0)"
            )
        if st.step == 0:
            self.metrics.print(run.first_line(self.model.num_parameters()))
        elif run.budget_s is not None:
            self.metrics.print(
                f"{minutes(run.budget_s - st.trained_s)} of the {minutes(run.budget_s)} budget "
                f"(--max-time {cfg.max_time:g}) left; {minutes(st.trained_s)} trained by step "
                f"{st.step}"
            )
        self.clock = clock = TrainClock(st.trained_s, now=self._now)
        clock.start()  # the first step's warm-up (or compile) is training time: it is real
        window = _Window(start=clock.seconds())
        estimate = _Estimate()
        progress = self._progress()
        while not progress.finished and not stop:
            lr = run.schedule.at(progress)
            optim.set_lr(self.optimizer, lr)
            loss, grad_norm, stop = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
            st.step += 1
            progress = self._progress()  # every rank: rank 0's clock
            last = progress.finished
            if math.isfinite(loss):
                st.window_loss += loss
                st.window_steps += 1
            window.tokens += run.tokens_per_step
            bar.update(1)
            if run.budget_s is not None:
                self._say_estimate(estimate, bar)
            if st.step % cfg.log_every == 0 or last:
                self._log_window(bar, window, lr, grad_norm)
            with clock.paused():  # evaluating and saving is not training time
                if st.step % cfg.eval_every == 0 or last:
                    if self._eval_and_log():
                        last_save_step = self._save_at(last_save_step)
                if st.step % cfg.save_every == 0 or stop:
                    last_save_step = self._save_at(last_save_step)
        with clock.paused():
            self._save_at(last_save_step)
        bar.close()
        if stop:
            self.metrics.print(
                f"interrupted: saved step {st.step}; continue with "
                f"`dtl train --resume {self.run_dir}`"
            )
        return self._summary(stop)

    def _progress(self) -> Progress:
        """How far the run is (`run_progress`), from the training clock: under --max-time
        rank 0's, so every rank takes the same lr and stops at the same step. The time is
        recorded in the state (saved with each checkpoint, what a resume continues from)."""
        st, run = self.state, self.resolved
        st.trained_s = self.clock.seconds()
        if run.budget_s is not None:
            st.trained_s = distributed.broadcast_from_main(st.trained_s, self.dist)
        return run_progress(st.step, st.trained_s, self.cfg.max_steps, run.budget_s)

    def _say_estimate(self, estimate: _Estimate, bar: tqdm) -> None:
        """Once ESTIMATE_AFTER_STEPS steps after this launch's first are timed: the steps and
        tokens the budget is likely to buy, at the rate measured."""
        st, run = self.state, self.resolved
        if estimate.said:
            return
        if estimate.first_s is None:  # the launch's first step (warm-up) is not in the rate
            estimate.first_step, estimate.first_s = st.step, st.trained_s
            return
        timed = st.step - estimate.first_step
        if timed < ESTIMATE_AFTER_STEPS:
            return
        estimate.said = True
        step_s = (st.trained_s - estimate.first_s) / timed
        left = max(0.0, run.budget_s - st.trained_s)
        steps = st.step + int(left / step_s) if step_s > 0 else st.step
        if self.cfg.max_steps is not None:
            steps = min(steps, self.cfg.max_steps)
        tokens_per_s = run.tokens_per_step / step_s if step_s > 0 else math.inf
        bar.total = steps
        bar.refresh()
        self.metrics.print(
            f"--max-time {minutes(run.budget_s)}: ~{steps:,} steps (~"
            f"{count(steps * run.tokens_per_step)} tokens) at {tokens_per_s:,.0f} tokens/s "
            f"(timed over steps {estimate.first_step + 1}-{st.step}: {step_s:.3g} s a step)"
            f"{self._decide_passes(steps, estimate)}"
        )

    def _decide_passes(self, steps: int, estimate: _Estimate) -> str:
        """A --max-time run without --max-steps plans no steps at setup, so whether it repeats
        its data (`repeats_data`, which sets Muon's embedding and head lrs) is decided here, at
        the estimate, once: in the launch that starts the run (a resume keeps the optimizer's
        saved ratios). What it decided, for the estimate's line ("" if nothing was)."""
        run, cfg = self.resolved, self.cfg
        if run.repeats is not None or estimate.first_step != 1:
            return ""
        planned = steps * run.tokens_per_step
        repeats = repeats_data(planned, run.epoch_tokens)
        note = f"; data read ~{planned / run.epoch_tokens:.2g}x"
        if run.optimizer == "muon":
            peaks = cfg.muon_options(run.schedule.lr, repeats)
            set_peak_lrs(self.optimizer, run.schedule.lr, peaks)
            note += f": Muon's embedding/head lrs {peaks['embed_lr']:.3g}/{peaks['head_lr']:.3g}"
        return note

    def _save_at(self, last_save_step: int | None) -> int:
        """Save this step unless it is saved already; the step saved."""
        if last_save_step != self.state.step:
            self.save()
        return self.state.step

    def _log_window(self, bar: tqdm, window: _Window, lr: float, grad_norm: float) -> None:
        """Log the steps since the last log line: their mean loss and throughput."""
        st, run = self.state, self.resolved
        elapsed = self.clock.seconds() - window.start  # training time: no eval, no saves
        record = {
            "step": st.step,
            # NaN, not 0, when every step of the window was skipped as non-finite.
            "loss": st.window_loss / st.window_steps if st.window_steps else math.nan,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": window.tokens / max(elapsed, 1e-9),
            "tokens": st.step * self.resolved.tokens_per_step,
            "peak_mem_mb": peak_mem_mb(self.device),
        }
        budget = ""
        if run.budget_s is not None:  # the time used, and the tokens the budget will reach
            left = max(0.0, run.budget_s - st.trained_s)
            projected = record["tokens"] + record["tokens_per_s"] * left
            if self.cfg.max_steps is not None:
                projected = min(projected, self.cfg.max_steps * run.tokens_per_step)
            record["trained_s"], record["projected_tokens"] = st.trained_s, int(projected)
            budget = (
                f" | {minutes(st.trained_s)} of {minutes(run.budget_s)}, "
                f"~{count(projected)} tokens by the end"
            )
        self.metrics.write(record)
        bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}"
        )
        self.metrics.print(
            f"step {st.step} | loss {record['loss']:.6f} | lr {lr:.3e} | "
            f"{record['tokens_per_s']:,.0f} tokens/s{budget}"
        )
        st.window_loss, st.window_steps = 0.0, 0
        window.start, window.tokens = self.clock.seconds(), 0

    def _eval_and_log(self) -> bool:
        """Evaluate, log, and say whether this is a new best (then it is saved and kept)."""
        result = self.evaluate()
        # trained_s: the training clock at this evaluation (evaluating and saving left out),
        # so metrics.jsonl gives the loss against training time as well as against steps
        trained = round(self.clock.seconds(), 3)
        self.metrics.write({"step": self.state.step, "trained_s": trained, **result})
        self.metrics.print(
            f"step {self.state.step} | val_loss {result['val_loss']:.4f} | "
            f"val_ppl {result['val_ppl']:.2f}"
        )
        if result["val_loss"] < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step = result["val_loss"], self.state.step
            return True
        return False

    def _summary(self, interrupted: bool) -> dict[str, Any]:
        last = self.metrics.last_eval()
        checkpoint = latest_checkpoint(self.run_dir) if self.dist.is_main else None
        return {
            "run_dir": str(self.run_dir),
            "step": self.state.step,
            "interrupted": interrupted,
            "val_loss": last["val_loss"] if last else None,
            "val_ppl": last["val_ppl"] if last else None,
            "best_val_loss": self.state.best_val_loss,
            "best_step": self.state.best_step,
            "checkpoint": str(checkpoint) if self.dist.is_main else None,
            "trained_s": self.state.trained_s,  # on the training clock (--max-time counts it)
            "tokens": self.state.step * self.resolved.tokens_per_step,
        }


@dataclass
class _Window:
    """The tokens and training time since the last log line (tokens per second)."""

    start: float  # the training clock's seconds at the window's start
    tokens: int = 0


@dataclass
class _Estimate:
    """What a --max-time run's estimate of its steps is measured from: the step and the
    training time after the launch's first step."""

    first_step: int = 0
    first_s: float | None = None
    said: bool = False


def count(n: float) -> str:
    """A number of tokens as a log line says it.

    >>> count(1_234_567), count(45_600), count(512)
    ('1.23M', '45.6k', '512')
    """
    if n >= 1e9:
        return f"{n / 1e9:.3g}G"
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}k"
    return f"{n:.0f}"


# ---------------------------------------------------------------------- train()
def train(cfg: TrainConfig, resume: ResumeFrom | bool | None = None) -> dict[str, Any]:
    """Train, or resume; returns a summary.

    `resume` is None (a new run), True (continue `cfg.out` from its newest checkpoint) or a
    `dtl.run_dir.ResumeFrom(run_dir, checkpoint)`: from an older checkpoint the run goes on
    from there, and the newer ones are moved aside (`dtl.run_dir.set_aside_newer`).
    """
    setup = trainer = None
    try:
        with disk_full_as_error(advice="free space or choose another --out"):
            setup = setup_run(cfg, resume)
            trainer = Trainer(setup=setup)
            return trainer.run()
    except Exception as err:
        if not is_oom(err):
            raise
        seq_len = setup.seq_len if setup else None  # unknown when the setup itself failed
        advice = oom_advice(cfg.batch_size, cfg.grad_accum, seq_len, cfg.preset)
        raise DtlError(advice) from None
    finally:
        # Free the model (FSDP keeps the process group and its pending gloo work alive) while
        # the interpreter is whole: one left to its finalisation could abort the process
        # ("terminate called without an active exception", seen once in ~20 FSDP runs).
        del trainer, setup
        gc.collect()
        distributed.teardown()
