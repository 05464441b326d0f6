"""`dtl train` and `dtl plot`: thin verbs over `dtl.train` and `dtl.train.plot`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from dtl.errors import DtlError

HELP = {
    "data": "a prepared data dir (dtl prepare), a raw source file (prepared into RUN_DIR/data), "
    "or a dataset name (e.g. wikitext-2, needs the network)",
    "out": "the run dir (config, metrics.jsonl, checkpoints/)",
    "preset": "model preset: tiny, small, medium, large, qa",
    "vocab_size": "model vocabulary (default: the data's tokenizer)",
    "d_model": "model width (default: the preset's)",
    "n_heads": "attention heads (default: the preset's)",
    "n_layers": "transformer blocks (default: the preset's)",
    "d_ff": "feed-forward width (default: the preset's)",
    "dropout": "dropout rate (default: the preset's, 0.1)",
    "seed": "seed of the weights, dropout and data order",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "seq_len": "tokens per row (default: the data's max_length)",
    "tokenizer": "tokenizer for a raw --data file: gpt2 or a dir from dtl tokenizer train",
    "max_steps": "optimizer steps to train",
    "batch_size": "rows per micro-batch (per process)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate",
    "min_lr": "learning-rate floor of the decay (default lr/10)",
    "warmup_steps": "linear warmup steps",
    "schedule": "lr schedule after warmup: cosine, linear, constant",
    "weight_decay": "AdamW weight decay (weight matrices only)",
    "decay_all": "decay every parameter (the spec's plain recipe; worse)",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "log_every": "steps between log lines",
    "eval_every": "steps between validation passes",
    "eval_batches": "validation batches per pass (a fixed set)",
    "save_every": "steps between checkpoints",
    "keep_last": "checkpoints kept (plus the best by val loss)",
    "precision": "auto, fp32, bf16, fp16 (auto: bf16/fp16 autocast on CUDA, fp32 on CPU)",
    "device": "auto, cpu, cuda, mps",
    "compile": "torch.compile the model",
    "activation_checkpointing": "recompute each block in backward (less memory, ~30%% slower)",
    "fsdp": "shard the model over torchrun processes (FSDP2; gloo on CPU, NCCL on GPUs) "
    "instead of DDP",
    "tensorboard": "also log to RUN_DIR/tensorboard",
    "skip_nonfinite": "skip at most N steps with a non-finite loss (fp16) instead of stopping",
    "progress": "show the progress bar",
}

EXAMPLES = """examples:
  dtl prepare corpus.txt -o data/corpus --tokenizer gpt2
  dtl train --data data/corpus --out runs/tiny --preset tiny --max-steps 300
  dtl train --data my-notes.txt --out runs/notes          # prepares the file first
  dtl train --config train.yaml --lr 3e-4                  # flags override the file
  dtl train --resume runs/tiny --max-steps 600             # continue exactly
  torchrun --nproc_per_node 2 -m dtl train --data data/corpus --out runs/ddp
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from dtl.cli import add_common

    p = subparsers.add_parser(
        "train",
        help="train a model, or --resume a run",
        description="Train a TransformerLM on prepared data. Every setting is a flag and a "
        "key of a YAML/JSON --config file (flags win); the resolved config is saved in the run dir.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file of settings (keys as the flags, _ or -)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    _add_config_flags(p)
    add_common(p)
    p.set_defaults(func=run_train)

    q = subparsers.add_parser(
        "plot",
        help="loss.png of a run",
        description="Plot train and val loss over steps from RUN_DIR/metrics.jsonl.",
        epilog="example:\n  dtl plot runs/tiny            # writes runs/tiny/loss.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("run_dir", help="a dtl train run dir")
    q.add_argument("-o", "--output", help="image path (default RUN_DIR/loss.png)")
    add_common(q)
    q.set_defaults(func=run_plot)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from dtl.train.loop import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        extra: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        text = HELP.get(f.name, f.name.replace("_", " "))
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text, **extra)
        else:
            if "default" not in text and f.default not in (None, ""):
                text = f"{text} (default {f.default})"
            p.add_argument(flag, type=kind, help=text, **extra)


def _field_type(f: dataclasses.Field) -> type:
    name = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "bool": bool, "str": str}[name]


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of settings."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise DtlError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise DtlError(f"--config {path}: not valid {file.suffix.lstrip('.') or 'YAML'} ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DtlError(f"--config {path}: expected a mapping of settings (key: value)")
    return data


def build_config(args: argparse.Namespace):
    """TrainConfig from defaults < (saved run config on --resume) < --config file < flags."""
    from dtl.train.loop import RESUME_LOCKED, TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    settings: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    if args.resume:
        saved = _saved_config(args.resume)
        settings.update({k: v for k, v in saved.items() if k in names})
    if args.config:
        settings.update({k.replace("-", "_"): v for k, v in load_config_file(args.config).items()})
    settings.update(flags)
    if args.resume:
        settings["out"] = args.resume
        changed = [k for k in RESUME_LOCKED if k in saved and not _same_setting(k, settings.get(k), saved[k])]
        if changed:
            diffs = ", ".join(f"{k}: {saved[k]!r} -> {settings.get(k)!r}" for k in changed)
            raise DtlError(
                f"cannot resume {args.resume} with a different {', '.join(changed)} ({diffs}); "
                "these fix the model or the data order. Drop those flags, or start a new --out"
            )
    try:
        return TrainConfig.from_dict(settings, source=args.config or "settings")
    except TypeError as err:
        raise DtlError(f"bad settings: {err}") from None


def _same_setting(key: str, given: Any, saved: Any) -> bool:
    """Equal settings; `data` paths compare resolved (config.yaml stores it absolute)."""
    if given == saved:
        return True
    if key == "data" and given and saved:
        from dtl.train.loop import absolute_data

        return absolute_data(str(given)) == absolute_data(str(saved))
    return False


def _saved_config(run_dir: str) -> dict[str, Any]:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise DtlError(f"--resume {run_dir}: no config.yaml there; is it a dtl train run dir?")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def run_train(args: argparse.Namespace) -> int:
    from dtl.train.loop import train

    cfg = build_config(args)
    summary = train(cfg, resume=bool(args.resume))
    if summary.get("checkpoint"):
        ppl = summary.get("val_ppl")
        shown = f"val_loss {summary['val_loss']:.4f}, val perplexity {ppl:.2f}" if ppl else "no eval"
        print(f"done: step {summary['step']}, {shown}; checkpoint {summary['checkpoint']}")
    return 130 if summary.get("interrupted") else 0


def run_plot(args: argparse.Namespace) -> int:
    from dtl.train.plot import plot_run

    try:
        path = plot_run(args.run_dir, args.output)
    except OSError as err:
        raise DtlError(f"cannot write the plot: {err}") from None
    print(f"wrote {path}")
    return 0
