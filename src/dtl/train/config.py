"""Every setting of a run (`TrainConfig`), and how a run's settings are resolved.

Settings come from four places, each overriding the one before:
TrainConfig's defaults < the saved RUN_DIR/config.yaml (on --resume) < a --config YAML/JSON
file < flags (`build_config`). The defaults that depend on the data or on other settings are
resolved here too, once: `prepare_length` (the rows a raw --data file is prepared into) and
`resolve_settings` (seq_len and min_lr, once the data's max_length is known).

>>> cfg = TrainConfig.from_dict({"data": "data/wiki", "max-steps": "200", "lr": "1e-3"})
>>> cfg.max_steps, cfg.lr
(200, 0.001)
>>> resolve_settings(cfg, data_max_length=128)
ResolvedSettings(seq_len=128, min_lr=0.0001)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dtl.errors import DtlError
from dtl.model.config import ModelConfig
from dtl.run_dir import CONFIG_FILE
from dtl.train import optim

# The model's sizes a run may set; its context (max_seq_length) is the preset's, never a flag.
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "max_seq_length")
# Settings a resumed run must share with the saved one: they fix the model or the data order.
RESUME_LOCKED = (
    "data", "preset", *MODEL_FIELDS, "seq_len", "batch_size", "grad_accum", "seed", "init_from"
)  # fmt: skip
# The max_length a raw --data file is prepared at when no --seq-len is given.
RAW_DATA_MAX_LENGTH = 256
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
    preset: str = "tiny"
    vocab_size: int | None = None  # None: the data's vocabulary
    d_model: int | None = None  # the model fields (MODEL_FIELDS): None is the preset's
    n_heads: int | None = None
    n_layers: int | None = None
    d_ff: int | None = None
    dropout: float | None = None
    seq_len: int | None = None  # tokens per row trained on; None: the data's max_length
    init_from: str | None = None  # a model whose weights a new run starts from (init_from.py)
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
            raise DtlError(
                "no training data: give --data DIR (a prepared dir, a file or a dataset name), "
                "or run `dtl quickstart` to train on the corpus inside DTL"
            )
        for name in POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DtlError(f"{flag_name(name)} must be a positive integer, got {value!r}")
        if self.seq_len is not None and self.seq_len < 1:
            raise DtlError(f"--seq-len must be a positive integer, got {self.seq_len!r}")
        for name in ("warmup_steps", "keep_last", "skip_nonfinite"):
            if getattr(self, name) < 0:
                raise DtlError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise DtlError(
                f"need lr > 0 and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise DtlError("--grad-clip and --weight-decay must be >= 0")
        if self.schedule not in optim.SCHEDULES:
            raise DtlError(
                f"unknown --schedule {self.schedule!r}; choose {', '.join(optim.SCHEDULES)}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """A TrainConfig from settings as a config file writes them: keys with - or _, values
        as strings or numbers (`source` names the file in errors)."""
        data = normalise_keys(data)
        kinds = setting_kinds()
        unknown = sorted(set(data) - set(kinds))
        if unknown:
            raise DtlError(f"{source}: unknown setting(s) {unknown}; valid keys: {sorted(kinds)}")
        return cls(**{k: _coerce(v, kinds[k], k, source) for k, v in data.items()})


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
        return {"float": float, "str": str}[kind](value)
    except (TypeError, ValueError):
        raise DtlError(f"{source}: {key} must be {kind}, got {value!r}") from None


# ---------------------------------------------------------------------- defaults < ... < flags
def build_config(
    flags: dict[str, Any], config_file: str | None = None, resume: str | None = None
) -> TrainConfig:
    """TrainConfig from defaults < the saved run config (`resume`) < `config_file` < `flags`.

    `flags` are the settings given on the command line. On `resume` (a run dir) the run's
    saved settings are the base, `out` is the run dir, and RESUME_LOCKED settings may not
    change.

    >>> cfg = build_config({"max_steps": 600}, resume="runs/tiny")  # doctest: +SKIP
    """
    settings: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    if resume and normalise_keys(flags).get("init_from"):
        raise DtlError(
            f"give --resume or --init-from, not both: --resume {resume} continues that run from "
            "its own checkpoints (a resumed fine-tune never reloads its source); --init-from "
            "starts a new run (with a new --out) from a model's weights"
        )
    if resume:
        saved = saved_config(resume)
        names = setting_kinds()
        settings.update({k: v for k, v in saved.items() if k in names})
    if config_file:
        settings.update(normalise_keys(load_config_file(config_file)))
    settings.update(normalise_keys(flags))
    if resume:
        settings["out"] = resume
        check_resume_locked(resume, settings, saved)
    try:
        return TrainConfig.from_dict(settings, source=config_file or "settings")
    except TypeError as err:
        raise DtlError(f"bad settings: {err}") from None


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of settings."""
    file = Path(path)
    if not file.is_file():
        raise DtlError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
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
@dataclass(frozen=True)
class ResolvedSettings:
    """The settings whose default depends on the data or on another setting."""

    seq_len: int  # tokens per row trained on (input_ids and targets are (B, seq_len))
    min_lr: float  # the floor the learning rate decays to


def prepare_length(cfg: TrainConfig) -> int:
    """The max_length a raw --data file is prepared into RUN_DIR/data at: --seq-len, else 256."""
    return RAW_DATA_MAX_LENGTH if cfg.seq_len is None else cfg.seq_len


def resolve_settings(cfg: TrainConfig, data_max_length: int) -> ResolvedSettings:
    """seq_len (--seq-len, else the data's max_length) and min_lr (--min-lr, else lr / 10).

    Rows are read from the data's rows of `data_max_length` tokens, so a longer --seq-len is
    an error, not a silent cut.
    """
    seq_len = data_max_length if cfg.seq_len is None else cfg.seq_len
    if seq_len > data_max_length:
        raise DtlError(
            f"--seq-len {seq_len} is longer than the data's rows ({data_max_length} tokens); "
            f"re-run dtl prepare with --max-length {seq_len} or lower --seq-len"
        )
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    return ResolvedSettings(seq_len=seq_len, min_lr=min_lr)
