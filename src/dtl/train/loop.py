"""The training loop of `dtl train`: data -> forward -> loss -> backward -> AdamW, with logs.

One optimizer step reads `grad_accum` micro-batches of `batch_size` rows on each of the
`world_size` ranks. Each micro-batch's mean loss is weighted by its share of the window's
scored tokens, so the accumulated gradient is exactly that of one big batch (padding and
masked tokens included), and gradients are zeroed after every step, so a partial window
never leaks into the next one.

>>> from dtl.train import TrainConfig, train
>>> summary = train(TrainConfig(data="data/wiki", out="runs/tiny", preset="tiny",
...                             max_steps=200))  # doctest: +SKIP
>>> summary["val_ppl"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dtl import run_dir as run_dir_layout
from dtl.errors import DtlError
from dtl.fileio import atomic_write_text
from dtl.model.config import ModelConfig
from dtl.model.transformer import IGNORE_INDEX, TransformerLM
from dtl.train import checkpoint as ckpt
from dtl.train import distributed, optim, precision

MODEL_FIELDS = ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "dropout")
# Settings a resumed run must share with the saved one: they fix the model or the data order.
RESUME_LOCKED = ("data", "preset", *MODEL_FIELDS, "seq_len", "batch_size", "grad_accum", "seed")
# fp16: a step whose gradients overflow at a loss scale this low is not the GradScaler's to
# skip (scaling down cannot help): it counts as non-finite, so the guard stops a run that the
# scaler would otherwise skip forever, its scale halving towards 0.
MIN_LOSS_SCALE = 1.0


@dataclass
class TrainConfig:
    """Every setting of a run; each is a `dtl train` flag and a key of a YAML/JSON config."""

    data: str = ""  # a prepared data dir, a raw source file, or a dataset name
    out: str = "runs/run"
    preset: str = "tiny"
    vocab_size: int | None = None  # None: the data's vocabulary
    d_model: int | None = None
    n_heads: int | None = None
    n_layers: int | None = None
    d_ff: int | None = None
    dropout: float | None = None
    seq_len: int | None = None  # None: the data's max_length
    tokenizer: str = "gpt2"  # for a raw --data file or dataset name
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1
    decay_all: bool = False  # the spec's plain recipe: decay every parameter
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 3
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    tensorboard: bool = False
    skip_nonfinite: int = 0
    progress: bool = True

    def validate(self) -> None:
        if not self.data:
            raise DtlError("no training data: give --data DIR (a prepared dir, a file or a dataset name), "
                           "or run `dtl quickstart` to train on the corpus inside DTL")
        positive = ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every",
                    "eval_batches", "save_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DtlError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "keep_last", "skip_nonfinite"):
            if getattr(self, name) < 0:
                raise DtlError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise DtlError(f"need lr > 0 and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise DtlError("--grad-clip and --weight-decay must be >= 0")
        if self.schedule not in optim.SCHEDULES:
            raise DtlError(f"unknown --schedule {self.schedule!r}; choose {', '.join(optim.SCHEDULES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DtlError(f"{source}: unknown setting(s) {unknown}; valid keys: {sorted(names)}")
        types = {f.name: str(f.type).replace(" | None", "") for f in dataclasses.fields(cls)}
        return cls(**{k: _coerce(v, types[k], k, source) for k, v in data.items()})


def absolute_data(data: str) -> str:
    """`--data` as an absolute path when it is an existing path (a dataset name stays)."""
    path = Path(data)
    return str(path.resolve()) if data and path.exists() else data


def _coerce(value: Any, kind: str, key: str, source: str) -> Any:
    """A config value as its field's type (YAML reads `3e-4` as a string, for one)."""
    if value is None:
        return None
    try:
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        return {"float": float, "str": str}[kind](value)
    except (TypeError, ValueError):
        raise DtlError(f"{source}: {key} must be {kind}, got {value!r}") from None


# ---------------------------------------------------------------------- the model wrapper
class LossModel(nn.Module):
    """`forward` = `model.loss`, so DDP/FSDP/compile see the loss as the module's forward
    (DDP only synchronises gradients of what runs through its forward)."""

    def __init__(self, model: TransformerLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, targets: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.model.loss(input_ids, targets, attention_mask)


def enable_activation_checkpointing(model: TransformerLM) -> None:
    """Recompute each block's activations in backward instead of keeping them.

    The block's `forward` is replaced on the instance, so parameter names (and therefore
    checkpoints) are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer_blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


# ---------------------------------------------------------------------- helpers
def peak_mem_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max_memory_allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from dtl.train.memory import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def _oom_advice(cfg: TrainConfig, seq_len: int) -> str:
    rows = f"--batch-size {cfg.batch_size}" + (f" x --seq-len {seq_len}" if seq_len else "")
    return (
        f"out of memory with {rows} (preset {cfg.preset}): lower "
        f"--batch-size (and raise --grad-accum to keep the effective batch "
        f"{cfg.batch_size * cfg.grad_accum}), lower --seq-len, add --activation-checkpointing, "
        "or on a GPU use --precision bf16/fp16; `dtl info --fit` suggests settings that fit"
    )


class _StopFlag:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save;
    a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------- run dir and data
def prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise DtlError(f"--out {run_dir} is a file, not a directory; choose another --out")
    if not resume and run_dir_layout.list_checkpoints(run_dir):
        raise DtlError(
            f"{run_dir} already holds a run with checkpoints; continue it with "
            f"`dtl train --resume {run_dir}` or pick a new --out (nothing was changed)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise DtlError(
            f"cannot write to run dir {run_dir} ({err.strerror or err}); choose a writable --out"
        ) from None
    return run_dir


def resolve_data(cfg: TrainConfig, run_dir: Path, dist: distributed.DistInfo,
                 resume: bool = False) -> Path:
    """A prepared data dir for `cfg.data`: as given, or prepared into RUN_DIR/data.

    RUN_DIR/data is reused on --resume, or when it was prepared from the same source file
    (its checksum), tokenizer and max_length; otherwise it is prepared again (atomically).
    """
    source = Path(cfg.data)
    if source.is_dir():
        return source
    prepared = run_dir / "data"
    if resume and (prepared / "meta.json").is_file():
        return prepared  # a resumed run keeps the data it was trained on
    name = cfg.data
    if not source.exists():
        if os.sep in name.removeprefix("hf:") or "." in source.name:
            raise DtlError(f"--data {cfg.data}: no such file or directory")
        name = name if name.startswith("hf:") else f"hf:{name}"  # a dataset name
    max_length = cfg.seq_len or 256
    if dist.is_main and not _prepared_matches(prepared, run_dir, source, name, cfg.tokenizer,
                                              max_length):
        from dtl.data.prepare import prepare

        print(f"preparing {cfg.data} into {prepared} (tokenizer {cfg.tokenizer}) ...", flush=True)
        marker = run_dir / DATA_SOURCE_FILE
        marker.unlink(missing_ok=True)
        prepare([name], prepared, tokenizer=cfg.tokenizer, max_length=max_length, seed=cfg.seed,
                progress=cfg.progress and sys.stderr.isatty())
        if name.startswith("hf:"):  # meta.json records files only: remember the name
            marker.write_text(name + "\n", encoding="utf-8")
    distributed.barrier(dist)  # every rank waits here, whatever rank 0 decided
    return prepared


DATA_SOURCE_FILE = ".data-source"  # the dataset name RUN_DIR/data was prepared from


def _prepared_matches(prepared: Path, run_dir: Path, source: Path, name: str, tokenizer: str,
                      max_length: int) -> bool:
    """Whether RUN_DIR/data was prepared from this source, tokenizer and max_length."""
    from dtl.data.shards import sha256_file

    try:
        meta = json.loads((prepared / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("max_length") != max_length:
        return False
    if not _same_tokenizer(str(meta.get("tokenizer")), tokenizer):
        return False
    sources = meta.get("sources") or []
    if name.startswith("hf:"):
        marker = run_dir / DATA_SOURCE_FILE
        return not sources and marker.is_file() and marker.read_text(encoding="utf-8").strip() == name
    if len(sources) != 1 or not isinstance(sources[0], dict):
        return False
    try:
        return (sources[0].get("bytes") == source.stat().st_size
                and sources[0].get("sha256") == sha256_file(source))
    except OSError:
        return False


def _same_tokenizer(saved: str, given: str) -> bool:
    if saved == given:
        return True
    a, b = Path(saved), Path(given)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def build_model_config(cfg: TrainConfig, meta: dict[str, Any], data_len: int) -> ModelConfig:
    """The model of the run: the preset's (or the flags') sizes and context, max_seq_length.

    The model is trained on rows of `--seq-len` tokens (default: the data's max_length);
    rows longer than the model's context are an error, never a silent change of the model.
    """
    vocab = int(meta["vocab_size"])
    if cfg.vocab_size is not None and cfg.vocab_size < vocab:
        raise DtlError(
            f"vocab mismatch: the model's vocab_size {cfg.vocab_size} is smaller than the data's "
            f"tokenizer ({meta.get('tokenizer')}, {vocab} tokens); drop --vocab-size or "
            "re-prepare the data with a smaller tokenizer"
        )
    seq_len = cfg.seq_len or data_len
    if seq_len > data_len:
        raise DtlError(
            f"--seq-len {seq_len} is longer than the data's rows ({data_len} tokens); "
            f"re-run dtl prepare with --max-length {seq_len} or lower --seq-len"
        )
    overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS if getattr(cfg, k) is not None}
    overrides.setdefault("vocab_size", vocab)
    model_config = ModelConfig.preset(cfg.preset, **overrides)
    limit = model_config.max_seq_length
    if seq_len > limit:
        given = "--seq-len" if cfg.seq_len else "the data's max_length"
        raise DtlError(
            f"rows of {seq_len} tokens ({given}) are longer than the model's context: the "
            f"{cfg.preset} preset's max_seq_length is {limit}; re-run `dtl prepare --max-length N` "
            f"with N <= {limit} (or pass --seq-len {limit}), or choose a preset with a longer "
            "context such as qa"
        )
    return model_config


def _resumed_context(run_dir: Path, model_config: ModelConfig, seq_len: int) -> ModelConfig:
    """Runs made before the context rule have max_seq_length = the data's max_length: a
    resumed run keeps its saved context (it fixes no weight) when the rows still fit it."""
    path = run_dir_layout.latest_checkpoint(run_dir)
    if path is None or not (path / "config.json").is_file():
        return model_config
    saved = ModelConfig.from_json(path / "config.json")
    same = dataclasses.replace(saved, max_seq_length=model_config.max_seq_length) == model_config
    if same and seq_len <= saved.max_seq_length:
        return saved
    return model_config


# ---------------------------------------------------------------------- the run
@dataclass
class _State:
    """What changes step by step (saved in training_state.pt with the optimizer etc.)."""

    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    skipped_nonfinite: int = 0
    window_loss: float = 0.0  # sum of step losses since the last log line
    window_steps: int = 0


class Trainer:
    """Holds the pieces of one run; `run()` is the loop. Built by `train()`."""

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        from dtl.data.loader import BatchLoader, read_meta
        from dtl.tokenizer import load_tokenizer

        cfg.validate()
        self.cfg = cfg
        self.dist = distributed.setup(cfg.device)
        if cfg.fsdp:
            distributed.check_fsdp(self.dist)  # before anything is written or prepared
        self.device = self.dist.device
        self.prec = precision.resolve_precision(cfg.precision, self.device)
        self.run_dir = prepare_run_dir(cfg, resume) if self.dist.is_main else Path(cfg.out)
        distributed.barrier(self.dist)
        self.data_dir = resolve_data(cfg, self.run_dir, self.dist, resume=resume)
        self.meta = read_meta(self.data_dir)
        self.tokenizer = load_tokenizer(str(self.data_dir))
        if int(self.tokenizer.vocab_size) != int(self.meta["vocab_size"]):
            raise DtlError(
                f"{self.data_dir}: meta.json says vocab_size {self.meta['vocab_size']} but its "
                f"tokenizer has {self.tokenizer.vocab_size}; re-run dtl prepare"
            )
        self.data_len = int(self.meta["max_length"])
        self.model_config = build_model_config(cfg, self.meta, self.data_len)
        self.seq_len = cfg.seq_len or self.data_len  # tokens per row trained on
        if resume:
            self.model_config = _resumed_context(self.run_dir, self.model_config, self.seq_len)
        self.min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr

        seed_everything(cfg.seed)
        self.model = TransformerLM(self.model_config).to(self.device)
        if self.dist.rank > 0:  # same initial weights everywhere, its own dropout masks per rank
            seed_everything(cfg.seed + 7919 * self.dist.rank)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.net = distributed.wrap(LossModel(self.model), self.dist, fsdp=cfg.fsdp)
        # FSDP shards self.model's own parameters in place (DTensors under their own names),
        # so the optimizer and its weight-decay groups are the same either way.
        self.optimizer = optim.build_optimizer(
            self.model,
            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
            decay_all=cfg.decay_all,
        )
        self.scaler = precision.grad_scaler(self.prec, self.device)
        self.forward = torch.compile(self.net) if cfg.compile else self.net
        kw = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        self.train_loader = BatchLoader(self.data_dir, "train", cfg.batch_size, seed=cfg.seed, **kw)
        self.val_loader_args = (self.data_dir, "val", cfg.batch_size)
        self.val_kwargs = {**kw, "shuffle": False}
        BatchLoader(*self.val_loader_args, **self.val_kwargs)  # an empty val split fails now
        self.state = _State()
        self._stop = _StopFlag()
        self.writer = self._tensorboard() if cfg.tensorboard and self.dist.is_main else None
        if resume:
            self._load_latest()
        elif self.dist.is_main:
            self._save_config()
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)

    # ------------------------------------------------------------------ config and resume
    def resolved_config(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self.cfg)
        settings["data"] = absolute_data(self.cfg.data)  # resumable from any directory
        return {
            **settings,
            "data_dir": str(Path(self.data_dir).resolve()),
            "model": self.model_config.to_dict(),
            "precision_resolved": self.prec.name,
            "device_resolved": str(self.device),
            "world_size": self.dist.world_size,
            "tokens_per_step": self.tokens_per_step,
        }

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size * self.seq_len

    def _save_config(self) -> None:
        import yaml

        text = yaml.safe_dump(self.resolved_config(), sort_keys=False)
        atomic_write_text(self.run_dir / "config.yaml", text)

    def _load_latest(self) -> None:
        path = run_dir_layout.latest_checkpoint(self.run_dir)
        if path is None:
            raise DtlError(f"{self.run_dir}: no checkpoint to resume from (checkpoints/step-N)")
        saved = TransformerLM.from_pretrained(path).config
        if saved != self.model_config:
            raise DtlError(
                f"cannot resume {self.run_dir}: its model is {saved} but these settings give "
                f"{self.model_config}; drop the changed model flags"
            )
        state = ckpt.load_training_state(path)
        if state.get("world_size", 1) != self.dist.world_size:
            raise DtlError(
                f"cannot resume {self.run_dir}: it ran on {state.get('world_size', 1)} process(es), "
                f"this launch has {self.dist.world_size}; the data order would differ"
            )
        # Under FSDP every rank reads the full weights (on CPU) and keeps its shard.
        device = "cpu" if self.cfg.fsdp else self.device
        weights = TransformerLM.from_pretrained(path, device=device).state_dict()
        if self.cfg.fsdp:
            distributed.load_full_state_dict(self.net, {f"model.{k}": v for k, v in weights.items()})
        else:
            self.model.load_state_dict(weights)
        self._load_optimizer(state["optimizer"])
        if state["scaler"]:  # empty when saved without a scaler (fp32/bf16): start a fresh one
            self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["loader"])
        self.state = _State(**state["progress"])
        ranks = state.get("rng_ranks")
        ckpt.set_rng_state(ranks[self.dist.rank] if ranks else state["rng"])
        if self.dist.is_main:
            self._save_config()
            self._truncate_metrics(self.state.step)
            print(f"resuming {self.run_dir} from {path.name}", flush=True)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines after the resumed step (written after the checkpoint, then lost)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and _line_step(ln) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    def _optimizer_state(self) -> dict:
        """The optimizer's state_dict; under FSDP gathered unsharded on rank 0 (collective),
        in the same layout, so either kind of run resumes from either kind of checkpoint."""
        if self.cfg.fsdp:
            return distributed.full_optimizer_state(self.net, self.optimizer)
        return self.optimizer.state_dict()

    def _load_optimizer(self, state: dict) -> None:
        if self.cfg.fsdp:
            distributed.load_full_optimizer_state(self.net, self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DtlError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # ------------------------------------------------------------------ one step
    def _batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        T = self.seq_len
        ids = batch["input_ids"][:, :T].to(self.device, non_blocking=True)
        targets = batch["targets"][:, :T].to(self.device, non_blocking=True)
        mask = batch.get("attention_mask")
        if mask is not None:
            mask = mask[:, :T]
            # Padding only on the right is invisible to causal attention (a real token never
            # looks ahead) and its targets are -100: passing None keeps the fused kernel.
            right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
            mask = None if right_padded else mask.to(self.device, non_blocking=True)
        return ids, targets, mask

    def train_step(self, batches: list[dict[str, Tensor]]) -> tuple[float, float, bool]:
        """One optimizer step over the micro-batches; returns (loss, grad norm, stop flag)."""
        parts = [self._batch(b) for b in batches]
        counts = torch.tensor([float((t != IGNORE_INDEX).sum()) for _, t, _ in parts])
        total = float(distributed.all_reduce_sum(counts.sum().clone(), self.dist))
        loss_sum = torch.zeros((), device=self.device)
        for i, (ids, targets, mask) in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext()
            if self.dist.enabled and not last and hasattr(self.net, "no_sync"):
                sync = self.net.no_sync()  # all-reduce gradients once, after the last micro-batch
            with sync:
                with precision.autocast(self.prec, self.device):
                    # Always through the wrapped forward, even with nothing scored (the loss
                    # is then 0 with zero gradients): DDP's reducer must all-reduce on every rank.
                    loss = self.forward(ids, targets, mask)  # mean over this micro-batch
                # Weight by this micro-batch's share of all scored tokens, times world_size
                # because DDP (and FSDP) average gradients over ranks: the sum is one big
                # batch's mean.
                weight = float(counts[i]) * self.dist.world_size / max(total, 1.0)
                self.scaler.scale(loss.float() * weight).backward()
            loss_sum += loss.detach().float() * counts[i]
        stop = torch.tensor([float(self._stop.requested)], device=self.device)
        reduced = distributed.all_reduce_sum(torch.cat([loss_sum.view(1), stop]), self.dist)
        step_loss = float(reduced[0]) / max(total, 1.0)

        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # Under FSDP these are sharded DTensors: their norm is the full gradient's (the shards'
        # norms are reduced over the ranks), so every rank clips by the same factor.
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])))
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
        return step_loss, grad_norm, bool(reduced[1] > 0)

    def _nonfinite(self, loss: float, grad_norm: float, note: str = "") -> None:
        step = self.state.step + 1
        if self.state.skipped_nonfinite < self.cfg.skip_nonfinite:
            self.state.skipped_nonfinite += 1
            self._print(f"step {step}: non-finite loss {loss} / grad norm {grad_norm}{note}; skipped "
                        f"({self.state.skipped_nonfinite} of --skip-nonfinite {self.cfg.skip_nonfinite})")
            return
        last = run_dir_layout.latest_checkpoint(self.run_dir)
        raise DtlError(
            f"loss is {loss} (grad norm {grad_norm}{note}) at step {step}: stopped instead of training "
            f"on garbage; last good checkpoint: {last if last else 'none saved yet'}. Lower --lr, "
            "use --precision fp32 or bf16, or allow a few skips with --skip-nonfinite N (fp16)"
        )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss over the first `eval_batches` val batches (a fixed set)."""
        from dtl.data.loader import BatchLoader

        loader = BatchLoader(*self.val_loader_args, **self.val_kwargs)
        n_batches = max(1, min(self.cfg.eval_batches, int(loader.batches_per_epoch)))
        self.net.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        for _, batch in zip(range(n_batches), loader, strict=False):
            ids, targets, mask = self._batch(batch)
            n = float((targets != IGNORE_INDEX).sum())
            with precision.autocast(self.prec, self.device):  # every rank runs every forward:
                loss = self.forward(ids, targets, mask)  # under FSDP each one is collective
            if n > 0:
                sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        self.net.train()
        sums = distributed.all_reduce_sum(sums.to(self.device), self.dist).cpu()
        val_loss = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}

    # ------------------------------------------------------------------ saving and logging
    def save(self) -> Path | None:
        """A checkpoint of the current step (collective under FSDP; rank 0 writes)."""
        optimizer_state = self._optimizer_state()
        model = self._full_model()
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
            }
            keep = (self.state.best_step,) if self.state.best_step >= 0 else ()
            path = ckpt.save_checkpoint(self.run_dir, self.state.step, model, state,
                                        tokenizer=self.tokenizer, keep_last=self.cfg.keep_last,
                                        keep=keep)
        distributed.barrier(self.dist)
        return path

    def _full_model(self) -> TransformerLM | None:
        """The model with all its weights (under FSDP gathered on rank 0, collective); None
        on the other ranks under FSDP, which do not save."""
        if not self.cfg.fsdp:
            return self.model
        full = distributed.full_state_dict(self.net)  # {} off rank 0
        if not self.dist.is_main:
            return None
        model = TransformerLM(self.model_config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()})
        return model

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def _print(self, text: str) -> None:
        if self.dist.is_main:
            from tqdm import tqdm

            tqdm.write(text)
            sys.stdout.flush()

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        with self._stop:
            try:
                return self._loop()
            except Exception as err:
                if _is_oom(err):
                    raise DtlError(_oom_advice(self.cfg, self.seq_len)) from None
                raise
            finally:
                if self.writer is not None:
                    self.writer.close()

    def _loop(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg, st = self.cfg, self.state
        bar = tqdm(total=cfg.max_steps, initial=st.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.is_main))
        self.net.train()
        batches = iter(self.train_loader)
        window_start, window_tokens = time.perf_counter(), 0
        last_save_step, interrupted = None, False
        if self.dist.is_main and st.step == 0:
            self._print(f"training {self.model.num_parameters():,} parameters on {self.device} "
                        f"({self.prec.name}), {self.tokens_per_step:,} tokens per step")
        while st.step < cfg.max_steps:
            lr = optim.lr_at(st.step, lr=cfg.lr, min_lr=self.min_lr, warmup_steps=cfg.warmup_steps,
                             max_steps=cfg.max_steps, schedule=cfg.schedule)
            optim.set_lr(self.optimizer, lr)
            loss, grad_norm, stop = self.train_step([next(batches) for _ in range(cfg.grad_accum)])
            st.step += 1
            if math.isfinite(loss):
                st.window_loss += loss
                st.window_steps += 1
            window_tokens += self.tokens_per_step
            bar.update(1)
            if st.step % cfg.log_every == 0 or st.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": st.step,
                    # NaN, not 0, when every step of the window was skipped as non-finite.
                    "loss": st.window_loss / st.window_steps if st.window_steps else math.nan,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "tokens": st.step * self.tokens_per_step,
                    "peak_mem_mb": peak_mem_mb(self.device),
                }
                self.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
                self._print(f"step {st.step} | loss {record['loss']:.6f} | lr {lr:.3e} | "
                            f"{record['tokens_per_s']:,.0f} tokens/s")
                st.window_loss, st.window_steps = 0.0, 0
                window_start, window_tokens = time.perf_counter(), 0
            if st.step % cfg.eval_every == 0 or st.step == cfg.max_steps:
                if self._eval_and_log():
                    self.save()
                    last_save_step = st.step
            if (st.step % cfg.save_every == 0 or stop) and last_save_step != st.step:
                self.save()
                last_save_step = st.step
            if stop:
                interrupted = True
                break
        if last_save_step != st.step:
            self.save()
        bar.close()
        if interrupted:
            self._print(f"interrupted: saved step {st.step}; continue with "
                        f"`dtl train --resume {self.run_dir}`")
        return self._summary(interrupted)

    def _eval_and_log(self) -> bool:
        """Evaluate, log, and say whether this is a new best (then it is saved and kept)."""
        result = self.evaluate()
        self.log({"step": self.state.step, **result})
        self._print(f"step {self.state.step} | val_loss {result['val_loss']:.4f} | "
                    f"val_ppl {result['val_ppl']:.2f}")
        if result["val_loss"] < self.state.best_val_loss:
            self.state.best_val_loss, self.state.best_step = result["val_loss"], self.state.step
            return True
        return False

    def _summary(self, interrupted: bool) -> dict[str, Any]:
        last = None
        metrics = self.run_dir / "metrics.jsonl"
        if self.dist.is_main and metrics.is_file():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if "val_loss" in rec:
                    last = rec
        return {
            "run_dir": str(self.run_dir),
            "step": self.state.step,
            "interrupted": interrupted,
            "val_loss": last["val_loss"] if last else None,
            "val_ppl": last["val_ppl"] if last else None,
            "best_val_loss": self.state.best_val_loss,
            "best_step": self.state.best_step,
            "checkpoint": str(run_dir_layout.latest_checkpoint(self.run_dir)) if self.dist.is_main else None,
        }


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume, with `resume=True` and `cfg.out` the run dir); returns a summary."""
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume)
        return trainer.run()
    except Exception as err:
        if _is_oom(err):
            raise DtlError(_oom_advice(cfg, cfg.seq_len or 0)) from None
        raise
    finally:
        # Free the model (FSDP keeps the process group and its pending gloo work alive) while
        # the interpreter is whole: one left to its finalisation could abort the process
        # ("terminate called without an active exception", seen once in ~20 FSDP runs).
        del trainer
        gc.collect()
        distributed.teardown()
