"""A run's setup, everything decided before a weight exists, in one order:

    settings checked -> processes, precision -> the --init-from source (loaded and checked)
    -> the run dir (made and checked: a raw --data file is prepared into it)
    -> data -> context (seq_len) -> model config -> lr schedule -> the memory check

into one frozen record, `ResolvedRun` (`dtl.train.config`), that the Trainer, config.yaml
and the first log line read. `RunSetup` adds the live objects beside it (the process group,
the precision's autocast and scaler, the tokenizer, the --init-from weights).

>>> setup = setup_run(TrainConfig(data="data/wiki", out="runs/tiny"))  # doctest: +SKIP
>>> setup.run.seq_len, setup.run.model.max_seq_length                  # doctest: +SKIP
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

from dtl.data.loader import META_FILE, TokenDataset, epoch_batches, read_meta
from dtl.data.prepare import prepare
from dtl.data.shards import sha256_file
from dtl.errors import DtlError
from dtl.fileio import atomic_write_text
from dtl.model.config import ModelConfig
from dtl.model.store import read_model_config
from dtl.run_dir import (
    CONFIG_FILE,
    DATA_DIR,
    DATA_SOURCE_FILE,
    ResumeFrom,
    latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
)
from dtl.tokenizer import Tokenizer, load_tokenizer
from dtl.train import distributed, memory, precision
from dtl.train.config import (
    MODEL_FIELDS,
    ResolvedRun,
    TrainConfig,
    as_resume,
    prepare_length,
    repeats_data,
    resolve_data_order,
    resolve_lr_schedule,
    resolve_optimizer,
    resolve_seq_len,
)
from dtl.train.init_from import InitSource, init_model_config, read_init_config, read_init_source


@dataclass
class RunSetup:
    """The resolved run (`run`, what every part reads) and the live objects it needs."""

    run: ResolvedRun
    dist: distributed.DistInfo
    prec: precision.Precision
    tokenizer: Tokenizer  # the data's (saved with every checkpoint)
    meta: dict[str, Any]  # the data dir's meta.json
    init: InitSource | None = None  # --init-from: the model (and weights) a new run starts from

    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def seq_len(self) -> int:
        return self.run.seq_len

    def save_config(self) -> None:
        """Write RUN_DIR/config.yaml (what --resume reads back)."""
        text = yaml.safe_dump(self.run.to_config(), sort_keys=False)
        atomic_write_text(self.run.run_dir / CONFIG_FILE, text)


def setup_run(cfg: TrainConfig, resume: ResumeFrom | bool | None = None) -> RunSetup:
    """Check the settings, join the processes, make the run dir, find (or prepare) the data
    and resolve the run (see the module docs).

    `resume` is a `ResumeFrom` (its checkpoint None: the newest), True (`cfg.out`, from its
    newest checkpoint) or None. Nothing is written before the settings, the device, --fsdp
    and an --init-from model are checked.
    """
    resume = as_resume(resume, cfg.out)
    cfg = dataclasses.replace(cfg)  # the run's own copy: a caller's later change is not the run's
    if resume is not None and Path(cfg.out) != resume.run_dir:
        cfg.out = str(resume.run_dir)  # the run resumed is where it writes
    cfg.validate()
    dist = distributed.setup(cfg.device)
    if cfg.fsdp:
        distributed.check_fsdp(dist)  # before anything is written or prepared
    prec = precision.resolve_precision(cfg.precision, dist.device)
    prec = precision.with_weight_copies(prec, dist.device, cfg.fsdp)
    init = None
    if cfg.init_from and resume is None:  # a resumed fine-tune continues from its checkpoints
        init = read_init_source(cfg.init_from)  # refused here if its weights hold NaN/Inf
        # A raw --data file is prepared with the model's tokenizer; config.yaml says so.
        cfg.tokenizer = init.tokenizer_spec
    created = _first_missing(Path(cfg.out)) if dist.is_main else None
    try:
        run_dir = prepare_run_dir(cfg, resume is not None) if dist.is_main else Path(cfg.out)
        return _setup_in(run_dir, cfg, resume, dist, prec, init)
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
    resume: ResumeFrom | None,
    dist: distributed.DistInfo,
    prec: precision.Precision,
    init: InitSource | None,
) -> RunSetup:
    """`setup_run` once the run dir exists: data -> context -> model -> lr schedule."""
    distributed.barrier(dist)
    context = init.config.context if init is not None else None
    data_dir = resolve_data(cfg, run_dir, dist, resume is not None, prepare_length(cfg, context))
    meta = read_meta(data_dir)
    tokenizer = _data_tokenizer(data_dir, meta)
    seq_len = resolve_seq_len(cfg, int(meta["max_length"]))
    model_config = resolve_model_config(cfg, meta, seq_len, tokenizer, init, resume)
    preset_context = None
    if not cfg.init_from:  # the preset's context, if raised to hold the rows
        base = ModelConfig.preset(cfg.preset).max_seq_length
        preset_context = base if model_config.max_seq_length > base else None
    passes, repeats, epoch_tokens = planned_passes(cfg, data_dir, seq_len, dist.world_size)
    run = ResolvedRun(
        cfg=cfg,
        run_dir=run_dir,
        data_dir=data_dir,
        seq_len=seq_len,
        model=model_config,
        schedule=resolve_lr_schedule(cfg, model_config.d_model),
        precision=prec.name,
        precision_why=prec.why,
        device=str(dist.device),
        world_size=dist.world_size,
        resume=resume,
        init_from=init.path if init is not None else None,
        preset_context=preset_context,
        passes=passes,
        repeats=repeats,
        epoch_tokens=epoch_tokens,
        data_order=resolve_data_order(cfg, repeats),
        optimizer=resolve_optimizer(cfg, repeats),
    )
    setup = RunSetup(run, dist, prec, tokenizer, meta, init)
    check_memory(setup)
    return setup


def planned_passes(
    cfg: TrainConfig, data_dir: Path, seq_len: int, world_size: int
) -> tuple[float | None, bool | None, int]:
    """(passes over the train split the run plans, whether it reads the data more than once:
    `repeats_data`; the tokens of one pass): max_steps x tokens per step against one epoch of
    the train loader. A run bounded by --max-time alone plans no steps yet: (None, None, epoch
    tokens), and the Trainer decides once its first steps are timed (`Trainer._say_estimate`)."""
    rows = len(TokenDataset(data_dir, "train", seq_len=seq_len))
    global_batch = cfg.batch_size * world_size
    epoch_tokens = epoch_batches(rows, global_batch) * global_batch * seq_len
    if cfg.max_steps is None:
        return None, None, epoch_tokens
    planned = cfg.max_steps * cfg.grad_accum * global_batch * seq_len
    return planned / epoch_tokens, repeats_data(planned, epoch_tokens), epoch_tokens


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
        setup.run.model,
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
    cfg: TrainConfig, run_dir: Path, dist: distributed.DistInfo, resume: bool, max_length: int
) -> Path:
    """A prepared data dir for `cfg.data`: as given, or prepared into RUN_DIR/data in rows
    of `max_length` tokens (`prepare_length`).

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
def resolve_model_config(
    cfg: TrainConfig,
    meta: dict[str, Any],
    seq_len: int,
    tokenizer: Tokenizer,
    init: InitSource | None,
    resume: ResumeFrom | None,
) -> ModelConfig:
    """context -> model: the config of the model a run trains on rows of `seq_len` tokens.

    A new run from a model's weights has that model's sizes and context; a resumed run the
    model its checkpoint holds (when the settings still give it); a new run its preset's,
    with the flags' sizes and a context that holds the rows. Each records `seq_len` as the
    context it trained at, which eval, generation and serving keep to.
    """
    if init is not None:
        overrides = {k: getattr(cfg, k) for k in MODEL_FIELDS}
        config = init_model_config(init, overrides, tokenizer, seq_len)
    elif resume is not None:
        config = _resumed_model_config(cfg, meta, seq_len, resume)
    else:
        config = build_model_config(cfg, meta, seq_len)
    return dataclasses.replace(config, trained_seq_len=seq_len)


def build_model_config(cfg: TrainConfig, meta: dict[str, Any], seq_len: int) -> ModelConfig:
    """The model of a new run: the preset's sizes with the flags' sizes, and a context
    (max_seq_length) of the preset's, raised to `seq_len` when the rows are longer.

    Raising it adds no parameter (the positions are sinusoidal, computed, not learnt), so the
    data decides the context: `dtl prepare` at any length, then `dtl train`, trains.

    >>> build_model_config(TrainConfig(data="d"), {"vocab_size": 512}, 512).max_seq_length
    512
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
    config = ModelConfig.preset(cfg.preset, **overrides)
    return dataclasses.replace(config, max_seq_length=max(config.max_seq_length, seq_len))


def _resumed_model_config(
    cfg: TrainConfig, meta: dict[str, Any], seq_len: int, resume: ResumeFrom
) -> ModelConfig:
    """The model a resumed run goes on with: its checkpoint's (`resume.checkpoint`, else the
    newest), read without its weights.

    A fine-tune (--init-from) keeps its own sizes, the source's, not the preset's (the
    source's config again when the checkpoint has none). A preset run keeps a context saved
    by a run from before the context rule (the data's max_length then) when the rows still
    fit it; otherwise the settings' model, which `checkpoint.load_latest` checks it against.
    """
    path = resume.checkpoint or latest_checkpoint(resume.run_dir)
    saved = None
    if path is not None and (path / "config.json").is_file():
        saved = read_model_config(path)[1]
    if cfg.init_from:
        return saved if saved is not None else read_init_config(cfg.init_from)
    config = build_model_config(cfg, meta, seq_len)
    if saved is None:
        return config
    same = dataclasses.replace(saved, max_seq_length=config.max_seq_length) == config
    return saved if same and seq_len <= saved.max_seq_length else config
