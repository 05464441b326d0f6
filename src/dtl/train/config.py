"""Every setting of a run (`TrainConfig`), and how a run's settings are resolved.

Settings come from four places, each overriding the one before:
TrainConfig's defaults < the saved RUN_DIR/config.yaml (on --resume) < a --config YAML/JSON
file < flags (`build_config`).

What depends on the data or on other settings is then decided once, in one order, by
`dtl.train.setup.setup_run`: data -> context -> model config -> lr/warmup/schedule, into one
frozen record, `ResolvedRun`, that the Trainer, RUN_DIR/config.yaml and the first log line
all read. The rules it applies live here: `prepare_length` (the rows a raw --data file is
prepared into), `resolve_seq_len` (the rows trained on), `resolve_lr_schedule`.

The defaults that fit the run (`LR_RULE`, `WARMUP_RULE`, shown in `dtl train --help`):
lr = 1e-3 * sqrt(128 / d_model) (1e-3 for the `tiny` preset, measured best of 1e-3 and
1.5e-3 there; 4.1e-4 at GPT-2 small's width 768), warmup = 5% of max_steps, at least 1 and at
most 500 steps; under --max-time, 5% of the budget (`TIME_WARMUP_RULE`).

>>> cfg = TrainConfig.from_dict({"data": "data/wiki", "max-steps": "200", "lr": "1e-3"})
>>> cfg.max_steps, cfg.lr
(200, 0.001)
>>> resolve_seq_len(cfg, data_max_length=128)
128
>>> resolve_lr_schedule(cfg, d_model=128)
LrSchedule(lr=0.001, min_lr=0.0001, warmup_steps=10, max_steps=200, schedule='wsd', warmup_fraction=None)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dtl.errors import DtlError
from dtl.model.config import DEFAULT_PRESET, TRAINED_FIELDS, ModelConfig, preset_context
from dtl.run_dir import CONFIG_FILE, ResumeFrom, resume_target
from dtl.train import optim
from dtl.train.clock import Progress

# The model's sizes a run may set; its context (max_seq_length) is the preset's, never a flag,
# and what it trained at (TRAINED_FIELDS) is recorded by training.
MODEL_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(ModelConfig)
    if f.name not in ("max_seq_length", *TRAINED_FIELDS)
)
# Settings a resumed run must share with the saved one: they fix the model or the data order.
RESUME_LOCKED = (
    "data", "preset", *MODEL_FIELDS, "seq_len", "batch_size", "grad_accum", "seed", "init_from"
)  # fmt: skip
# Overrides that hold for the launch that gives them: a resumed run checks again.
ONE_LAUNCH = ("memory_check", "data_check")
# The learning-rate and warmup defaults (see the module docstring): lr from the model's width,
# warmup a fraction of the run, capped. Chosen with benchmarks/bench_quality.py.
LR_REF, LR_REF_WIDTH = 1e-3, 128
WARMUP_FRACTION, WARMUP_CAP = 0.05, 500
LR_RULE = f"{LR_REF:g} * sqrt({LR_REF_WIDTH} / d_model)"
WARMUP_RULE = f"{WARMUP_FRACTION:.0%} of max_steps, 1 to {WARMUP_CAP} steps"
# Under --max-time the schedule follows the training clock (`dtl.train.clock`): the warmup is
# the same share of the run, counted in time.
TIME_WARMUP_RULE = f"{WARMUP_FRACTION:.0%} of the --max-time budget"
DEFAULT_MAX_STEPS = 1000  # without --max-time; with it, --max-steps is a cap only when given
OPTIMIZERS = ("adamw", "muon", "auto")
# Muon's embedding and head lrs over the AdamW lr (--embed-lr's and --head-lr's defaults) for
# a run that reads its data once: measured best of 1x, 3x, 10x each (benchmarks/
# bench_quality.py, issue 23, 300 steps: embedding 2.551, 2.494, 2.480 val bits/byte; head at
# embedding 3x 2.494, 2.420, and 2.428 at 10x). A run that repeats its data keeps 1x: there
# the higher lrs overfit (1,562 steps, 4.3 passes: 2.186 against 2.128 at 1x).
EMBED_LR_RATIO = 10.0
HEAD_LR_RATIO = 3.0
# How the train split's packed rows are cut, epoch by epoch (`dtl.data.loader.BatchLoader`):
# rows: the data's own rows every epoch; offsets: from the second epoch on, rows that start at
# a random offset; auto: offsets when the run reads its data more than once (`repeats_data`).
DATA_ORDERS = ("auto", "rows", "offsets")
POSITIVE = (
    "max_steps",
    "batch_size",
    "grad_accum",
    "log_every",
    "eval_every",
    "eval_batches",
    "save_every",
)


@dataclass
class TrainConfig:
    """Every setting of a run; each is a `dtl train` flag and a key of a YAML/JSON config."""

    data: str = ""  # a prepared data dir, a raw source file, or a dataset name
    out: str = "runs/run"
    preset: str = DEFAULT_PRESET
    vocab_size: int | None = None  # None: the data's vocabulary
    d_model: int | None = None  # the model fields (MODEL_FIELDS): None is the preset's
    n_heads: int | None = None
    n_layers: int | None = None
    d_ff: int | None = None
    dropout: float | None = None
    seq_len: int | None = None  # tokens per row trained on; None: the data's max_length
    init_from: str | None = None  # a model whose weights a new run starts from (init_from.py)
    tokenizer: str = "gpt2"  # for a raw --data file or dataset name
    max_steps: int | None = None  # None: DEFAULT_MAX_STEPS, or no step cap under max_time
    max_time: float | None = None  # minutes of training (dtl.train.clock); None: by steps
    batch_size: int = 8
    grad_accum: int = 1
    # adamw; muon (Muon for the blocks' matrices, AdamW the rest); auto (`resolve_optimizer`)
    optimizer: str = "auto"
    lr: float | None = None  # None: LR_RULE (from the model's width)
    muon_lr: float = 0.02  # Muon's peak lr (--optimizer muon), on the same schedule
    # Muon's AdamW groups' peak lrs, on the same schedule; None: `muon_options`'s rule
    embed_lr: float | None = None  # the token embedding
    head_lr: float | None = None  # the LM head's matrix (untied, per the spec)
    scalar_lr: float | None = None  # biases and LayerNorms
    # Muon's momentum rises linearly from muon_momentum_start over the first
    # muon_momentum_warmup steps (modded-nanogpt's 0.85 -> 0.95 over 300; 0: no warmup)
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup: int = 300
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int | None = None  # None: WARMUP_RULE
    schedule: str = "wsd"  # measured better than cosine for AdamW and Muon (issue 23)
    decay_fraction: float = optim.DECAY_FRACTION  # --schedule wsd: the last share of the run, decaying
    data_order: str = "auto"  # DATA_ORDERS
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
    # Checks a user may turn off for one launch (never inherited by --resume: ONE_LAUNCH).
    memory_check: bool = True  # refuse a run whose memory plan exceeds the free memory
    data_check: bool = True  # refuse a resume whose data differs from the checkpoint's

    def __post_init__(self) -> None:
        # A run by steps trains DEFAULT_MAX_STEPS unless told; a run by time has no step cap
        # unless one is given (then it stops at whichever comes first).
        if self.max_steps is None and self.max_time is None:
            self.max_steps = DEFAULT_MAX_STEPS

    def validate(self) -> None:
        if not self.data:
            raise DtlError(
                "no training data: give --data DIR (a prepared dir, a file or a dataset name), "
                "or run `dtl quickstart` to train on the corpus inside DTL"
            )
        for name in POSITIVE:
            value = getattr(self, name)
            if name == "max_steps" and value is None and self.max_time is not None:
                continue  # bounded by time alone
            if not isinstance(value, int) or value < 1:
                raise DtlError(f"{flag_name(name)} must be a positive integer, got {value!r}")
        parse_max_time(self.max_time)  # set from Python: the same check as the flag's
        if self.max_time is not None and self.warmup_steps is not None:
            raise DtlError(
                f"--warmup-steps counts steps, and a --max-time run warms up over "
                f"{TIME_WARMUP_RULE}: drop --warmup-steps (or train by --max-steps)"
            )
        if self.seq_len is not None and self.seq_len < 1:
            raise DtlError(f"--seq-len must be a positive integer, got {self.seq_len!r}")
        for name in ("warmup_steps", "keep_last", "skip_nonfinite", "muon_momentum_warmup"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise DtlError(f"{flag_name(name)} must be >= 0, got {value}")
        if self.lr is not None and not self.lr > 0 or not self.muon_lr > 0:
            raise DtlError(f"--lr and --muon-lr must be > 0, got {self.lr} and {self.muon_lr}")
        for name in ("embed_lr", "head_lr", "scalar_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise DtlError(f"{flag_name(name)} must be > 0, got {value}")
        for name in ("muon_momentum", "muon_momentum_start"):
            if not 0 <= getattr(self, name) < 1:
                raise DtlError(f"{flag_name(name)} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.decay_fraction <= 1:
            raise DtlError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        if self.data_order not in DATA_ORDERS:
            raise DtlError(
                f"unknown --data-order {self.data_order!r}; choose {', '.join(DATA_ORDERS)}"
            )
        if self.min_lr is not None and self.min_lr < 0:
            raise DtlError(f"--min-lr must be >= 0, got {self.min_lr}")
        if self.optimizer not in OPTIMIZERS:
            raise DtlError(
                f"unknown --optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}"
            )
        if self.optimizer == "muon" and self.decay_all:  # auto with --decay-all: adamw
            raise DtlError(
                "--decay-all is AdamW's plain recipe; --optimizer muon decays only the head's "
                "matrix: drop one of the two"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise DtlError("--grad-clip and --weight-decay must be >= 0")
        if self.schedule not in optim.SCHEDULES:
            raise DtlError(
                f"unknown --schedule {self.schedule!r}; choose {', '.join(optim.SCHEDULES)}"
            )

    def muon_options(self, lr: float, repeats: bool | None) -> dict[str, Any]:
        """What `muon.build_muon` takes besides the lrs every optimizer has, at the run's
        resolved AdamW peak `lr`: the embedding's and head's peaks are EMBED_LR_RATIO and
        HEAD_LR_RATIO times `lr` on data read once, `lr` on data the run `repeats`
        (`repeats_data`), unless --embed-lr / --head-lr name them.

        >>> [TrainConfig(data="d").muon_options(1e-3, r)["embed_lr"] for r in (False, True)]
        [0.01, 0.001]
        """
        embed, head = (1.0, 1.0) if repeats else (EMBED_LR_RATIO, HEAD_LR_RATIO)
        return {
            "embed_lr": embed * lr if self.embed_lr is None else self.embed_lr,
            "head_lr": head * lr if self.head_lr is None else self.head_lr,
            "scalar_lr": self.scalar_lr,
            "momentum": self.muon_momentum,
            "momentum_start": self.muon_momentum_start,
            "momentum_warmup": self.muon_momentum_warmup,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """A TrainConfig from settings as a config file writes them: keys with - or _, values
        as strings or numbers (`source` names the file in errors)."""
        data = normalise_keys(data)
        kinds = setting_kinds()
        unknown = sorted(set(data) - set(kinds))
        if unknown:
            raise DtlError(f"{source}: unknown setting(s) {unknown}; valid keys: {sorted(kinds)}")
        coerce = {"max_time": lambda v, *_: parse_max_time(v)}  # its own clear messages
        return cls(**{k: coerce.get(k, _coerce)(v, kinds[k], k, source) for k, v in data.items()})


def parse_max_time(value: Any) -> float | None:
    """--max-time as minutes: a positive, finite number (a flag's or a file's text, or a
    number), or None (not given); anything else is one clear error.

    >>> parse_max_time("2.5"), parse_max_time(None)
    (2.5, None)
    >>> parse_max_time("ten")
    Traceback (most recent call last):
    dtl.errors.DtlError: --max-time must be a positive number of minutes (e.g. --max-time 10 or 0.5), got 'ten'
    """
    if value is None:
        return None
    try:
        minutes = float(value)
        if isinstance(value, bool) or not (math.isfinite(minutes) and minutes > 0):
            raise ValueError
    except (TypeError, ValueError):
        raise DtlError(
            "--max-time must be a positive number of minutes (e.g. --max-time 10 or 0.5), "
            f"got {value!r}"
        ) from None
    return minutes


def setting_kinds() -> dict[str, str]:
    """Each setting's type, without its None: {"data": "str", "seq_len": "int", ...}."""
    return {f.name: str(f.type).replace(" | None", "") for f in dataclasses.fields(TrainConfig)}


def normalise_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """Setting names as TrainConfig spells them: `batch-size` and `batch_size` are one key."""
    return {key.replace("-", "_"): value for key, value in settings.items()}


def flag_name(key: str) -> str:
    """The command-line flag of a setting: `batch_size` -> `--batch-size`."""
    return "--" + key.replace("_", "-")


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
        if kind == "float" and not math.isfinite(float(value)):
            raise ValueError  # 1e400 reads as inf
        return {"float": float, "str": str}[kind](value)
    except (TypeError, ValueError, OverflowError):  # int(float("1e400")) overflows
        raise DtlError(f"{source}: {key} must be {kind}, got {value!r}") from None


# ---------------------------------------------------------------------- defaults < ... < flags
def build_config(
    flags: dict[str, Any],
    config_file: str | None = None,
    resume: ResumeFrom | str | os.PathLike | None = None,
) -> TrainConfig:
    """TrainConfig from defaults < the saved run config (`resume`) < `config_file` < `flags`.

    `flags` are the settings given on the command line. On `resume` (a `ResumeFrom`, or a
    run dir) the run's saved settings are the base, `out` is the run dir, and RESUME_LOCKED
    settings may not change.

    >>> cfg = build_config({"max_steps": 600}, resume="runs/tiny")  # doctest: +SKIP
    """
    settings: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    target = as_resume(resume)
    run_dir = str(target.run_dir) if target is not None else ""
    if target is not None and normalise_keys(flags).get("init_from"):
        raise DtlError(
            f"give --resume or --init-from, not both: --resume {run_dir} continues that run from "
            "its own checkpoints (a resumed fine-tune never reloads its source); --init-from "
            "starts a new run (with a new --out) from a model's weights"
        )
    if target is not None:
        saved = saved_config(run_dir)
        names = setting_kinds()
        settings.update({k: v for k, v in saved.items() if k in names and k not in ONE_LAUNCH})
    if config_file:
        settings.update(normalise_keys(load_config_file(config_file)))
    settings.update(normalise_keys(flags))
    if target is not None:
        settings["out"] = run_dir
        check_resume_locked(run_dir, settings, saved)
    try:
        return TrainConfig.from_dict(settings, source=config_file or "settings")
    except TypeError as err:
        raise DtlError(f"bad settings: {err}") from None


def as_resume(
    resume: ResumeFrom | bool | str | os.PathLike | None, out: str | os.PathLike = ""
) -> ResumeFrom | None:
    """The one value a resume is, from what a caller may pass: a `ResumeFrom`; True (the run
    dir `out`, from its newest checkpoint); a run dir or `RUN_DIR/checkpoints/step-N`; or
    None / False (a new run).

    >>> as_resume(True, "runs/tiny")
    ResumeFrom(run_dir=PosixPath('runs/tiny'), checkpoint=None)
    >>> as_resume(None) is as_resume(False) is None
    True
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        return ResumeFrom(Path(out))
    if isinstance(resume, ResumeFrom):
        return resume
    return resume_target(resume)


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of settings."""
    file = Path(path)
    if not file.is_file():
        raise DtlError(f"--config {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # e.g. a checkpoint .pt passed as the config
        raise DtlError(
            f"--config {path}: not a text file; pass a YAML or JSON file of settings"
        ) from None
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = file.suffix.lstrip(".") or "YAML"
        raise DtlError(f"--config {path}: not valid {kind} ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DtlError(f"--config {path}: expected a mapping of settings (key: value)")
    return data


def saved_config(run_dir: str) -> dict[str, Any]:
    """The settings a run saved in RUN_DIR/config.yaml (what --resume starts from)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DtlError(f"--resume {run_dir}: no {CONFIG_FILE} there; is it a dtl train run dir?")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def check_resume_locked(run_dir: str, settings: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse a resume that changes a setting which fixes the model or the data order."""
    changed = [
        k for k in RESUME_LOCKED if k in saved and not same_setting(k, settings.get(k), saved[k])
    ]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {settings.get(k)!r}" for k in changed)
        raise DtlError(
            f"cannot resume {run_dir} with a different {', '.join(changed)} ({diffs}); "
            "these fix the model or the data order. Drop those flags, or start a new --out"
        )


def same_setting(key: str, given: Any, saved: Any) -> bool:
    """Equal settings; `data` paths compare resolved (config.yaml stores it absolute)."""
    if given == saved:
        return True
    if key == "data" and given and saved:
        return absolute_data(str(given)) == absolute_data(str(saved))
    return False


def absolute_data(data: str) -> str:
    """`--data` as an absolute path when it is an existing path (a dataset name stays)."""
    path = Path(data)
    return str(path.resolve()) if data and path.exists() else data


# ---------------------------------------------------------------------- resolved defaults
def prepare_length(cfg: TrainConfig, context: int | None = None) -> int:
    """The max_length a raw --data file is prepared into RUN_DIR/data at: --seq-len, else
    the model's context: `context` (an --init-from source's), else the preset's
    max_seq_length, as `dtl prepare` does."""
    if cfg.seq_len is not None:
        return cfg.seq_len
    return context if context is not None else preset_context(cfg.preset)


def resolve_seq_len(cfg: TrainConfig, data_max_length: int) -> int:
    """The tokens per row a run trains on: --seq-len, else the data's max_length.

    Rows are read from the data's rows of `data_max_length` tokens, so a longer --seq-len is
    an error, not a silent cut.
    """
    seq_len = data_max_length if cfg.seq_len is None else cfg.seq_len
    if seq_len > data_max_length:
        raise DtlError(
            f"--seq-len {seq_len} is longer than the data's rows ({data_max_length} tokens); "
            f"re-run dtl prepare with --max-length {seq_len} or lower --seq-len"
        )
    return seq_len


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate at each point of a run: linear warmup to `lr`, then `schedule` down
    to `min_lr` at the end (`optim.lr_at`), read off the run's progress
    (`dtl.train.clock.run_progress`: steps, or the share of a --max-time budget)."""

    lr: float  # AdamW's peak learning rate
    min_lr: float  # the floor the learning rate decays to
    warmup_steps: int  # by steps; unused under a time budget
    max_steps: int | None  # None: bounded by time alone
    schedule: str  # cosine, linear, constant, wsd
    # Under --max-time: the warmup's share of the run (TIME_WARMUP_RULE); None: by steps.
    warmup_fraction: float | None = None
    decay_fraction: float = dataclasses.field(default=optim.DECAY_FRACTION, repr=False)  # wsd's decay

    def at(self, progress: Progress) -> float:
        """The lr of the optimizer step taken at `progress` (`dtl.train.clock.run_progress`).

        >>> LrSchedule(1e-3, 1e-4, 10, 100, "cosine").at(Progress(0, 100))
        0.0001
        >>> LrSchedule(1e-3, 1e-4, 0, None, "cosine", warmup_fraction=0.05).at(
        ...     Progress(525_000, 1_000_000))  # halfway through the decay after 5% of warmup
        0.00055
        """
        warmup = self.warmup_steps
        if self.warmup_fraction is not None:
            warmup = self.warmup_fraction * progress.total
        return optim.lr_at(
            progress.done,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=warmup,
            max_steps=progress.total,
            schedule=self.schedule,
            decay_fraction=self.decay_fraction,
        )


def resolve_lr_schedule(cfg: TrainConfig, d_model: int) -> LrSchedule:
    """lr (--lr, else LR_RULE at the model's width `d_model`), warmup_steps (--warmup-steps,
    else WARMUP_RULE) and min_lr (--min-lr, else lr / 10). `d_model` is the model the run
    trains: its preset's and flags', or an --init-from source's."""
    lr = default_lr(d_model) if cfg.lr is None else cfg.lr
    min_lr = lr / 10 if cfg.min_lr is None else cfg.min_lr
    if min_lr > lr:
        raise DtlError(f"--min-lr {min_lr:g} is above the peak lr {lr:.3g}; lower --min-lr")
    if cfg.max_time is not None:  # the warmup is a share of the budget (validate: no steps)
        return LrSchedule(
            lr, min_lr, 0, cfg.max_steps, cfg.schedule, WARMUP_FRACTION, cfg.decay_fraction
        )
    warmup = default_warmup(cfg.max_steps) if cfg.warmup_steps is None else cfg.warmup_steps
    return LrSchedule(
        lr, min_lr, warmup, cfg.max_steps, cfg.schedule, decay_fraction=cfg.decay_fraction
    )


def repeats_data(planned_tokens: int, epoch_tokens: int) -> bool:
    """Whether a run will read its training data more than once: the one rule behind
    `--data-order auto` and `--optimizer auto`. `epoch_tokens` is what one pass over the
    train split feeds (`dtl.data.loader.BatchLoader`'s batches per epoch x rows x tokens).

    >>> repeats_data(1_600_000, 369_536), repeats_data(300_000, 369_536)
    (True, False)
    """
    return planned_tokens > epoch_tokens


def resolve_data_order(cfg: TrainConfig, repeats: bool | None) -> str:
    """`--data-order`: rows or offsets; auto is offsets when the run `repeats` its data.

    >>> resolve_data_order(TrainConfig(data="d"), repeats=True)
    'offsets'
    """
    if cfg.data_order != "auto":
        return cfg.data_order
    # Not known yet (--max-time alone): offsets, which change nothing in a run that ends
    # within its first pass (the first pass is never offset)
    return "rows" if repeats is False else "offsets"


def resolve_optimizer(cfg: TrainConfig, repeats: bool | None) -> str:
    """`--optimizer`: adamw or muon; auto is muon, except with --decay-all (AdamW's plain
    recipe) or --init-from. Measured (benchmarks/bench_quality.py, issue 23) against AdamW with the same wsd
    schedule: better on a run that reads its data once (2.42 vs 2.76 val bits/byte at 300
    steps) and on one that `repeats` it (2.60 vs 2.72 at 300 steps, 4.7 passes; 2.13 vs 2.19
    at 1,562 steps, 4.3 passes), so the passes do not change the choice today; the rule keeps
    them as its input, and the first log line shows both.

    A second stage (--init-from) keeps AdamW: Muon's fixed peak (--muon-lr) ignores the lower
    --lr a fine-tune runs at, and fine-tunes were not measured with it.

    >>> resolve_optimizer(TrainConfig(data="d"), repeats=True)
    'muon'
    """
    if cfg.optimizer != "auto":
        return cfg.optimizer
    return "adamw" if cfg.decay_all or cfg.init_from else "muon"


@dataclass(frozen=True)
class ResolvedRun:
    """Everything a run decided before its first weight, once, in order (data -> context ->
    model -> lr schedule): what the Trainer builds from, what RUN_DIR/config.yaml holds
    (`to_config`) and what the first log line says (`first_line`).

    >>> run = setup_run(TrainConfig(data="notes-data", out="runs/notes")).run  # doctest: +SKIP
    >>> run.seq_len, run.model.max_seq_length, run.schedule.lr  # doctest: +SKIP
    (512, 512, 0.001)
    """

    cfg: TrainConfig  # the settings as given (an --init-from run's tokenizer filled in)
    run_dir: Path
    data_dir: Path  # a prepared data dir (meta.json, shards, the tokenizer's files)
    seq_len: int  # tokens per row trained on: input_ids and targets are (batch_size, seq_len)
    model: ModelConfig  # its trained_seq_len is seq_len
    schedule: LrSchedule
    precision: str  # resolved: fp32, bf16 or fp16 (`dtl.train.precision.resolve_precision`)
    device: str
    world_size: int
    resume: ResumeFrom | None = None  # None: a new run
    init_from: Path | None = None  # the model a new run starts from (--init-from), resolved
    # The preset's max_seq_length when the model's was raised to hold rows of seq_len
    # (None: not raised). Sinusoidal positions are computed, not learnt: no new parameters.
    preset_context: int | None = None
    precision_why: str = ""  # what --precision auto saw, said in the first line ("" if named)
    # planned tokens / one pass over the train split's tokens, and whether the run reads its
    # train split more than once (`repeats_data`); None under --max-time alone: the Trainer
    # decides once its first steps are timed
    passes: float | None = 0.0
    repeats: bool | None = False
    epoch_tokens: int = 0  # tokens one pass over the train split feeds
    data_order: str = "rows"  # resolved --data-order: rows or offsets
    optimizer: str = "adamw"  # resolved --optimizer: adamw or muon

    @property
    def budget_s(self) -> float | None:
        """--max-time in seconds of training (None: a run by steps)."""
        return None if self.cfg.max_time is None else self.cfg.max_time * 60.0

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, over every rank."""
        cfg = self.cfg
        return cfg.batch_size * cfg.grad_accum * self.world_size * self.seq_len

    def to_config(self) -> dict[str, Any]:
        """What RUN_DIR/config.yaml holds: every setting as given, and what the run resolved."""
        settings = dataclasses.asdict(self.cfg)
        settings["data"] = absolute_data(self.cfg.data)  # resumable from any directory
        record = {
            **settings,
            "data_dir": str(Path(self.data_dir).resolve()),
            "model": self.model.to_dict(),
            "precision_resolved": self.precision,
            "device_resolved": self.device,
            "world_size": self.world_size,
            "tokens_per_step": self.tokens_per_step,
            "lr_resolved": self.schedule.lr,
            "warmup_steps_resolved": self.schedule.warmup_steps,
            "min_lr_resolved": self.schedule.min_lr,
            "optimizer_resolved": self.optimizer,
            "data_order_resolved": self.data_order,
        }
        if self.schedule.warmup_fraction is not None:  # a --max-time run warms up by time
            record["warmup_steps_resolved"] = None
            record["warmup_fraction_resolved"] = self.schedule.warmup_fraction
        if self.init_from is not None:  # the source's context is the model's max_seq_length
            record["init_from_resolved"] = str(self.init_from)
            record["init_from_max_seq_length"] = self.model.max_seq_length
        return record

    def first_line(self, n_params: int) -> str:
        """The log line a new run starts with: the model, device, batch, lr schedule and,
        when the preset's context was raised to hold the rows, that."""
        cfg, lr = self.cfg, self.schedule
        muon = ""
        if self.optimizer == "muon":
            groups = cfg.muon_options(lr.lr, self.repeats)
            muon = (
                f", muon lr {cfg.muon_lr:g}, embedding lr {groups['embed_lr']:.3g}, head lr "
                f"{groups['head_lr']:.3g}"
            )
        context = ""
        if self.preset_context is not None:
            context = (
                f", context {self.model.max_seq_length} tokens (the {cfg.preset} preset's "
                f"{self.preset_context} raised to hold rows of {self.seq_len}: sinusoidal "
                "positions, no new parameters)"
            )
        why = f", {self.precision_why}" if self.precision_why else ""
        warmup = f"{lr.warmup_steps} steps"
        budget = ""
        if self.budget_s is not None:
            warmup = f"{lr.warmup_fraction:.0%} of the time"
            cap = f" or {cfg.max_steps:,} steps, whichever comes first" if cfg.max_steps else ""
            budget = (
                f"; training for {minutes(self.budget_s)}{cap} (evaluation and saving not "
                "counted; the steps that buys are estimated after the first few)"
            )
        return (
            f"training {n_params:,} parameters on {self.device} ({self.precision}{why}){context}, "
            f"{self.tokens_per_step:,} tokens per step; adamw lr {lr.lr:.3g}{muon}, warmup "
            f"{warmup}, {lr.schedule} to {lr.min_lr:.3g}{budget}; "
            f"{self.recipe_note()}"
        )

    def recipe_note(self) -> str:
        """What the data's passes decided (`repeats_data`): the optimizer and the data order,
        each marked `(auto)` when the rule chose it.

        >>> run = setup_run(TrainConfig(data="data/wiki", optimizer="auto")).run  # doctest: +SKIP
        >>> run.recipe_note()  # doctest: +SKIP
        'data read 4.3x: adamw (auto), random row offsets after the first pass (auto)'
        """
        cfg = self.cfg
        if self.passes is None:
            reads = "data passes decided once the first steps are timed"
        elif self.passes < 1:
            reads = f"{self.passes:.0%} of the data read"
        else:
            reads = f"data read {self.passes:.2g}x" if self.repeats else "data read once"
        order = "random row offsets after the first pass"
        if self.data_order == "rows":
            order = "the data's rows"
        auto = {True: " (auto)", False: ""}
        return (
            f"{reads}: {self.optimizer}{auto[cfg.optimizer == 'auto']}, "
            f"{order}{auto[cfg.data_order == 'auto']}"
        )


def minutes(seconds: float) -> str:
    """A span of training time as the log says it.

    >>> minutes(600), minutes(90), minutes(2.5)
    ('10 min', '1.5 min', '2.5 s')
    """
    if seconds < 60:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min"


def default_lr(d_model: int) -> float:
    """LR_RULE: the default peak lr of a model `d_model` wide.

    >>> default_lr(128), round(default_lr(768), 6)
    (0.001, 0.000408)
    """
    return LR_REF * math.sqrt(LR_REF_WIDTH / d_model)


def default_warmup(max_steps: int) -> int:
    """WARMUP_RULE: warmup steps of a run of `max_steps`.

    >>> default_warmup(40), default_warmup(1562), default_warmup(100_000)
    (2, 78, 500)
    """
    return min(WARMUP_CAP, max(1, round(WARMUP_FRACTION * max_steps)))
