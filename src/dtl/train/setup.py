"""A run's setup, everything decided before a weight exists: the processes and precision,
the run dir, the data (a raw --data file is prepared into RUN_DIR/data), the resolved
settings and the model's config.

>>> setup = setup_run(TrainConfig(data="data/wiki", out="runs/tiny"))  # doctest: +SKIP
>>> setup.seq_len, setup.model_config.max_seq_length                   # doctest: +SKIP
(128, 256)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dtl.data.loader import META_FILE, read_meta
from dtl.data.prepare import prepare
from dtl.data.shards import sha256_file
from dtl.errors import DtlError
from dtl.fileio import atomic_write_text
from dtl.model.config import ModelConfig
from dtl.run_dir import (
    CONFIG_FILE,
    DATA_DIR,
    DATA_SOURCE_FILE,
    latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
)
from dtl.tokenizer import Tokenizer, load_tokenizer
from dtl.train import distributed, memory, precision
from dtl.train.config import (
    MODEL_FIELDS,
    ResolvedSettings,
    TrainConfig,
    absolute_data,
    model_width,
    prepare_length,
    resolve_settings,
)
from dtl.train.init_from import InitSource, init_model_config, read_init_source


@dataclass
class RunSetup:
    """What `setup_run` decided; the Trainer builds the model, optimizer and loaders from it."""

    cfg: TrainConfig
    resume: bool
    dist: distributed.DistInfo
    prec: precision.Precision
    run_dir: Path
    data_dir: Path  # a prepared data dir (meta.json, shards, the tokenizer's files)
    meta: dict[str, Any]  # its meta.json
    tokenizer: Tokenizer
    settings: ResolvedSettings
    model_config: ModelConfig
    init: InitSource | None = None  # --init-from: the model whose weights a new run starts from
    resume_from: Path | None = None  # --resume RUN_DIR/checkpoints/step-N (None: the newest)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def seq_len(self) -> int:
        return self.settings.seq_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, over every rank."""
        cfg = self.cfg
        return cfg.batch_size * cfg.grad_accum * self.dist.world_size * self.seq_len

    def resolved_config(self) -> dict[str, Any]:
        """What RUN_DIR/config.yaml holds: every setting as given, and what the run resolved."""
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
            "lr_resolved": self.settings.lr,
            "warmup_steps_resolved": self.settings.warmup_steps,
            "min_lr_resolved": self.settings.min_lr,
            **self._init_record(),
        }

    def _init_record(self) -> dict[str, Any]:
        """Where the weights came from (--init-from), kept with the run; the source's context
        is the model's max_seq_length, `seq_len` what this run trained at."""
        if self.init is None:
            return {}
        return {
            "init_from_resolved": str(self.init.path),
            "init_from_max_seq_length": self.init.config.max_seq_length,
        }

    def save_config(self) -> None:
        """Write RUN_DIR/config.yaml (what --resume reads back)."""
        text = yaml.safe_dump(self.resolved_config(), sort_keys=False)
        atomic_write_text(self.run_dir / CONFIG_FILE, text)


def setup_run(
    cfg: TrainConfig, resume: bool = False, resume_from: str | os.PathLike | None = None
) -> RunSetup:
    """Check the settings, join the processes, make the run dir and find (or prepare) the data.

    `resume_from` is the checkpoint a resumed run continues from (default: its newest).
    Nothing is written before the settings, the device and --fsdp are checked.
    """
    resume_from = Path(resume_from) if resume_from is not None else None
    cfg.validate()
    dist = distributed.setup(cfg.device)
    if cfg.fsdp:
        distributed.check_fsdp(dist)  # before anything is written or prepared
    prec = precision.resolve_precision(cfg.precision, dist.device)
    init = None
    if cfg.init_from and not resume:  # a resumed fine-tune continues from its own checkpoints
        init = read_init_source(cfg.init_from)
        # A raw --data file is prepared with the model's tokenizer; config.yaml says so.
        cfg = dataclasses.replace(cfg, tokenizer=init.tokenizer_spec)
    created = _first_missing(Path(cfg.out)) if dist.is_main else None
    try:
        run_dir = prepare_run_dir(cfg, resume) if dist.is_main else Path(cfg.out)
        return _setup_in(run_dir, cfg, resume, dist, prec, init, resume_from)
    except BaseException:
        if created is not None:  # a failed start leaves no empty run dir of its own behind
            _remove_empty_dirs(created)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what mkdir -p would create)."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_empty_dirs(top: Path) -> None:
    """Remove `top` and the folders under it that hold no file (data prepared into the run
    dir before a later check failed is kept: the next attempt reuses it)."""
    for folder, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(folder)
        except OSError:  # not empty
            pass


def _setup_in(
    run_dir: Path,
    cfg: TrainConfig,
    resume: bool,
    dist: distributed.DistInfo,
    prec: Any,
    init: Any,
    resume_from: Path | None,
) -> RunSetup:
    """`setup_run` once the run dir exists: the data, the tokenizer and the model config."""
    distributed.barrier(dist)
    data_dir = resolve_data(cfg, run_dir, dist, resume=resume)
    meta = read_meta(data_dir)
    tokenizer = _data_tokenizer(data_dir, meta)
    settings = resolve_settings(cfg, int(meta["max_length"]))
    if init is not None:
        overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS}
        model_config = init_model_config(init, overrides, tokenizer, settings.seq_len)
    elif resume and cfg.init_from:
        model_config = _resumed_fine_tune(run_dir, cfg, resume_from)
    else:
        model_config = build_model_config(cfg, meta, settings.seq_len)
        if resume:
            model_config = _resumed_context(run_dir, model_config, settings.seq_len, resume_from)
    # the saved model records the context it trains at: eval, generation and serving keep to it
    model_config = dataclasses.replace(model_config, trained_seq_len=settings.seq_len)
    if model_config.d_model != model_width(cfg):  # a fine-tune's width is its source's
        settings = resolve_settings(cfg, int(meta["max_length"]), d_model=model_config.d_model)
    setup = RunSetup(
        cfg, resume, dist, prec, run_dir, data_dir, meta, tokenizer, settings, model_config, init,
        resume_from,
    )  # fmt: skip
    check_memory(setup)
    return setup


def check_memory(setup: RunSetup) -> None:
    """Refuse, before a weight or batch is allocated, a run whose memory plan needs more than
    the device has free (else the kernel kills it, or CUDA fails, mid-step). CPU processes of
    one machine share its memory; FSDP shards the plan's weights (not modelled: not checked).
    """
    cfg, device = setup.cfg, setup.device
    if not cfg.memory_check or cfg.fsdp:
        return
    available = memory.available_memory(device)
    if available is None:
        return
    need = memory.training_need(
        setup.model_config,
        cfg.batch_size,
        setup.seq_len,
        setup.prec.name,
        cfg.activation_checkpointing,
        device.type,
        cfg.grad_accum,
    )
    if device.type == "cpu":  # every process on this machine holds its own copy
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", setup.dist.world_size))
    if need > available:
        raise DtlError(
            memory.memory_refusal(
                need,
                available,
                cfg.batch_size,
                cfg.grad_accum,
                setup.seq_len,
                f"preset {cfg.preset}, {setup.prec.name} on {device}",
            )
        )


def _resumed_fine_tune(run_dir: Path, cfg: TrainConfig, checkpoint: Path | None) -> ModelConfig:
    """A resumed --init-from run keeps its own model config (its sizes are the source's,
    not the preset's): its checkpoint's (default the newest), else the source's again."""
    path = checkpoint or latest_checkpoint(run_dir)
    if path is not None and (path / "config.json").is_file():
        return ModelConfig.from_json(path / "config.json")
    return read_init_source(cfg.init_from).config


def _data_tokenizer(data_dir: Path, meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer saved with the data; its vocabulary must be the one meta.json names."""
    tokenizer = load_tokenizer(str(data_dir))
    if int(tokenizer.vocab_size) != int(meta["vocab_size"]):
        raise DtlError(
            f"{data_dir}: {META_FILE} says vocab_size {meta['vocab_size']} but its "
            f"tokenizer has {tokenizer.vocab_size}; re-run dtl prepare"
        )
    return tokenizer


# ---------------------------------------------------------------------- the run dir
def check_out_not_a_file(run_dir: Path) -> None:
    """--out names a folder (new or not): refuse a file there."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DtlError(f"--out {run_dir} is a file, not a directory; choose another --out")


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """`cfg.out`, made and checked writable; a new run never reuses one holding checkpoints."""
    run_dir = Path(cfg.out)
    check_out_not_a_file(run_dir)
    if not resume and list_checkpoints(run_dir):
        raise DtlError(
            f"{run_dir} already holds a run with checkpoints; continue it with "
            f"`dtl train --resume {run_dir}` or pick a new --out (nothing was changed)"
        )
    for stale in remove_stale_temporaries(run_dir):  # left by a killed run
        print(f"removed {stale}, left by a run that was killed", file=sys.stderr, flush=True)
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


# ---------------------------------------------------------------------- the data
def resolve_data(
    cfg: TrainConfig, run_dir: Path, dist: distributed.DistInfo, resume: bool = False
) -> Path:
    """A prepared data dir for `cfg.data`: as given, or prepared into RUN_DIR/data.

    RUN_DIR/data is reused on --resume, or when it was prepared from the same source file
    (its checksum), tokenizer and max_length; otherwise it is prepared again (atomically).
    """
    source = Path(cfg.data)
    if source.is_dir():
        return source
    prepared = run_dir / DATA_DIR
    if resume and (prepared / META_FILE).is_file():
        return prepared  # a resumed run keeps the data it was trained on
    name = cfg.data
    if not source.exists():
        if os.sep in name.removeprefix("hf:") or "." in source.name:
            raise DtlError(f"--data {cfg.data}: no such file or directory")
        name = name if name.startswith("hf:") else f"hf:{name}"  # a dataset name
    max_length = prepare_length(cfg)
    # Rank 0 alone decides and prepares; the others wait at the barrier and read its result.
    if dist.is_main and not _prepared_matches(
        prepared, run_dir, source, name, cfg.tokenizer, max_length
    ):
        print(f"preparing {cfg.data} into {prepared} (tokenizer {cfg.tokenizer}) ...", flush=True)
        marker = run_dir / DATA_SOURCE_FILE
        marker.unlink(missing_ok=True)
        show = cfg.progress and sys.stderr.isatty()
        prepare(
            [name],
            prepared,
            tokenizer=cfg.tokenizer,
            max_length=max_length,
            seed=cfg.seed,
            progress=show,
        )
        if name.startswith("hf:"):  # meta.json records files only: remember the name
            marker.write_text(name + "\n", encoding="utf-8")
    distributed.barrier(dist)  # every rank waits here, whatever rank 0 decided
    return prepared


def _prepared_matches(
    prepared: Path, run_dir: Path, source: Path, name: str, tokenizer: str, max_length: int
) -> bool:
    """Whether RUN_DIR/data was prepared from this source, tokenizer and max_length."""
    try:
        meta = json.loads((prepared / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("max_length") != max_length:
        return False
    if not _same_tokenizer(str(meta.get("tokenizer")), tokenizer):
        return False
    sources = meta.get("sources") or []
    if name.startswith("hf:"):
        marker = run_dir / DATA_SOURCE_FILE
        return (
            not sources and marker.is_file() and marker.read_text(encoding="utf-8").strip() == name
        )
    if len(sources) != 1 or not isinstance(sources[0], dict):
        return False
    try:
        same_size = sources[0].get("bytes") == source.stat().st_size
        return same_size and sources[0].get("sha256") == sha256_file(source)
    except OSError:
        return False


def _same_tokenizer(saved: str, given: str) -> bool:
    if saved == given:
        return True
    a, b = Path(saved), Path(given)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


# ---------------------------------------------------------------------- the model's config
def build_model_config(cfg: TrainConfig, meta: dict[str, Any], seq_len: int) -> ModelConfig:
    """The model of the run: the preset's sizes and context, with the flags' sizes.

    Rows of `seq_len` tokens (the resolved --seq-len) longer than the model's context are an
    error, never a silent change of the model.
    """
    vocab = int(meta["vocab_size"])
    if cfg.vocab_size is not None and cfg.vocab_size < vocab:
        raise DtlError(
            f"vocab mismatch: the model's vocab_size {cfg.vocab_size} is smaller than the data's "
            f"tokenizer ({meta.get('tokenizer')}, {vocab} tokens); drop --vocab-size or "
            "re-prepare the data with a smaller tokenizer"
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


def _resumed_context(
    run_dir: Path, model_config: ModelConfig, seq_len: int, checkpoint: Path | None = None
) -> ModelConfig:
    """Runs made before the context rule have max_seq_length = the data's max_length: a
    resumed run keeps its saved context (it fixes no weight) when the rows still fit it."""
    path = checkpoint or latest_checkpoint(run_dir)
    if path is None or not (path / "config.json").is_file():
        return model_config
    saved = ModelConfig.from_json(path / "config.json")
    same = dataclasses.replace(saved, max_seq_length=model_config.max_seq_length) == model_config
    if same and seq_len <= saved.max_seq_length:
        return saved
    return model_config
