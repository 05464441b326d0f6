"""`dtl train` and `dtl plot`: thin verbs over `dtl.train` and `dtl.train.plot`.

The flags are TrainConfig's fields; `dtl.train.config.build_config` resolves them with the
saved run (--resume) and a --config file; `dtl.train.train` runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from dtl.cli import say_threads
from dtl.errors import DtlError
from dtl.model.config import DEFAULT_PRESET, preset_context
from dtl.run_dir import resume_target
from dtl.train import train
from dtl.train.config import (
    DEFAULT_MAX_STEPS,
    LR_RULE,
    TIME_WARMUP_RULE,
    WARMUP_RULE,
    TrainConfig,
    build_config,
    flag_name,
    minutes,
    setting_kinds,
)
from dtl.train.loop import count
from dtl.train.plot import plot_run

HELP = {
    "data": "a prepared data dir (dtl prepare), a raw source file (prepared into RUN_DIR/data), "
    "or a dataset name (e.g. wikitext-2, needs the network)",
    "out": "the run dir (config, metrics.jsonl, checkpoints/)",
    "preset": f"model preset: tiny, small, medium, large, qa (default {DEFAULT_PRESET}); its "
    "max_seq_length is raised to hold longer rows (sinusoidal positions: no new parameters)",
    "vocab_size": "model vocabulary (default: the data's tokenizer)",
    "d_model": "model width (default: the preset's)",
    "n_heads": "attention heads (default: the preset's)",
    "n_layers": "transformer blocks (default: the preset's)",
    "d_ff": "feed-forward width (default: the preset's)",
    "dropout": "dropout rate (default: the preset's, 0.1)",
    "seed": "seed of the weights, dropout and data order",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "seq_len": "tokens per row trained on (default: the data's max_length); a raw --data file "
    "is prepared into rows of this many (default: the model's context, the --preset's "
    f"max_seq_length: {preset_context()} for {DEFAULT_PRESET}; an --init-from model's)",
    "tokenizer": "tokenizer for a raw --data file: gpt2 or a dir from dtl tokenizer train "
    "(with --init-from: the model's own)",
    "init_from": "start a new run from this model's weights (a run dir, checkpoint dir or "
    "legacy .pt): fresh optimizer, schedule and step 0; its sizes, context and tokenizer are "
    "kept (a flag that changes a size is an error); not with --resume",
    "max_steps": f"optimizer steps to train (default {DEFAULT_MAX_STEPS}; with --max-time, none "
    "unless given: then the run stops at whichever comes first)",
    "max_time": "train for this many minutes (a float: 0.5 is 30 s) on the training clock, which "
    "counts the steps (the first one's warm-up too) but not evaluation or saving; the lr "
    f"schedule follows the time (warmup {TIME_WARMUP_RULE.replace('%', '%%')}, then the decay "
    "to the end); it evaluates and saves at the end; --resume continues the same budget",
    "batch_size": "rows per micro-batch (per process)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "optimizer": "adamw, or muon: Muon (orthogonalised momentum) for the blocks' Q/K/V/out and "
    "FFN matrices, AdamW for embeddings, head, biases, LayerNorms; or auto: muon (measured better "
    "whether the data repeats or not), adamw with --decay-all or --init-from (default auto)",
    "lr": f"peak AdamW learning rate (default {LR_RULE}: 1e-3 at d_model 128, 4.1e-4 at 768)",
    "muon_lr": "peak Muon learning rate, same schedule (default 0.02)",
    "embed_lr": "with Muon: the token embedding's peak lr (default 10 x the lr, 1 x when "
    "the run repeats its data)",
    "head_lr": "with Muon: the LM head matrix's peak lr (default 3 x the lr, 1 x when the "
    "run repeats its data)",
    "scalar_lr": "with Muon: the biases' and LayerNorms' peak lr (default --lr)",
    "muon_momentum": "Muon's momentum after its warmup (default 0.95)",
    "muon_momentum_start": "Muon's momentum at step 0, rising linearly to --muon-momentum "
    "(default 0.85)",
    "muon_momentum_warmup": "steps over which Muon's momentum rises (default 300; 0: none)",
    "decay_fraction": "--schedule wsd: the last fraction of the run over which the lr decays "
    "linearly to --min-lr (default 0.4)",
    "data_order": "rows: the data's packed rows, shuffled, every epoch; offsets: from the "
    "second pass on, rows start at a random offset (other contexts of the same tokens); auto: "
    "offsets when the run reads its data more than once (default auto)",
    "min_lr": "learning-rate floor of the decay (default lr/10)",
    "warmup_steps": f"linear warmup steps (default {WARMUP_RULE.replace('%', '%%')}: 2 at --max-steps 40, "
    "50 at 1000; not with --max-time, which warms up by time)",
    "schedule": "lr schedule after warmup: cosine, linear, constant, or wsd (constant, then "
    "linear to --min-lr over the last --decay-fraction of the run)",
    "weight_decay": "AdamW weight decay (weight matrices only)",
    "decay_all": "decay every parameter (the spec's plain recipe; worse)",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "log_every": "steps between log lines",
    "eval_every": "steps between validation passes",
    "eval_batches": "validation batches per pass (a fixed set)",
    "save_every": "steps between checkpoints",
    "keep_last": "checkpoints kept (plus the best by val loss)",
    "precision": "auto, fp32, bf16, fp16 (auto: bf16/fp16 autocast on CUDA; bf16 on a CPU "
    "with AVX512-BF16 or AMX, else fp32; fp32: exact fp32)",
    "device": "auto, cpu, cuda, mps",
    "compile": "torch.compile the model",
    "activation_checkpointing": "recompute each block in backward (less memory, ~30%% slower)",
    "fsdp": "shard the model over torchrun processes (FSDP2; gloo on CPU, NCCL on GPUs) "
    "instead of DDP",
    "tensorboard": "also log to RUN_DIR/tensorboard",
    "skip_nonfinite": "skip at most N steps with a non-finite loss (fp16) instead of stopping",
    "progress": "show the progress bar",
    "memory_check": "refuse a run whose memory plan (dtl info) needs more than the free memory "
    "(--no-memory-check: try anyway)",
    "data_check": "refuse a --resume whose data dir differs from the checkpoint's "
    "(--no-data-check: continue on the new data)",
}

EXAMPLES = """examples:
  dtl prepare corpus.txt -o data/corpus --tokenizer gpt2
  dtl train --data data/corpus --out runs/tiny --max-steps 300      # the tiny preset
  dtl train --data data/corpus --out runs/small --preset small
  dtl train --data data/corpus --out runs/10min --max-time 10  # 10 minutes of training
  dtl train --data my-notes.txt --out runs/notes          # prepares the file first
  dtl train --data data/corpus --out runs/adamw --optimizer adamw --schedule cosine
  dtl train --config train.yaml --lr 3e-4                  # flags override the file
  dtl train --resume runs/tiny --max-steps 600             # continue exactly
  dtl train --resume runs/tiny/checkpoints/step-400        # go on from an older checkpoint
  dtl train --data data/corpus --out runs/t1 --threads 1    # leave a core to others
  dtl prepare squad.json -o data/qa --tokenizer runs/tiny/checkpoints/latest --answer-only-loss
  dtl train --init-from runs/tiny --data data/qa --out runs/tiny-qa --max-steps 200 --lr 3e-4
  torchrun --nproc_per_node 2 -m dtl train --data data/corpus --out runs/ddp
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from dtl.cli import add_common, add_threads

    p = subparsers.add_parser(
        "train",
        help="train a model, or --resume a run",
        description="Train a TransformerLM on prepared data. Every setting is a flag and a "
        "key of a YAML/JSON --config file (flags win); the resolved config is saved in the run dir.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file of settings (keys as the flags, _ or -)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this run from its latest checkpoint, or from an older one: "
        "RUN_DIR/checkpoints/step-N (the newer checkpoints are moved aside, not deleted)",
    )
    _add_config_flags(p)
    add_threads(p)
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
    """One flag per TrainConfig setting, typed as its field; unset flags stay out of args."""
    kinds = setting_kinds()
    for f in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "bool": bool, "str": str}[kinds[f.name]]
        extra: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if f.name == "init_from":
            extra["metavar"] = "MODEL"
        if f.name == "max_time":  # read by parse_max_time: a bad value is one line, no usage
            kind, extra["metavar"] = str, "MINUTES"
        text = HELP.get(f.name, f.name.replace("_", " "))
        if kind is bool:
            action = argparse.BooleanOptionalAction
            p.add_argument(flag_name(f.name), action=action, help=text, **extra)
        else:
            if "default" not in text and f.default not in (None, ""):
                text = f"{text} (default {f.default})"
            p.add_argument(flag_name(f.name), type=kind, help=text, **extra)


def run_train(args: argparse.Namespace) -> int:
    names = setting_kinds()  # the flags given (unset ones are not in args)
    flags = {name: value for name, value in vars(args).items() if name in names}
    resume = resume_target(args.resume) if args.resume else None  # one value from here on
    cfg = build_config(flags, config_file=args.config, resume=resume)
    say_threads(args)
    summary = train(cfg, resume=resume)
    if summary.get("checkpoint"):
        ppl = summary.get("val_ppl")
        shown = (
            f"val_loss {summary['val_loss']:.4f}, val perplexity {ppl:.2f}" if ppl else "no eval"
        )
        trained = ""
        if cfg.max_time is not None:  # what the budget bought
            trained = (
                f" ({minutes(summary['trained_s'])} of training, {count(summary['tokens'])} tokens)"
            )
        print(f"done: step {summary['step']}{trained}, {shown}; checkpoint {summary['checkpoint']}")
    return 130 if summary.get("interrupted") else 0


def run_plot(args: argparse.Namespace) -> int:
    try:
        path = plot_run(args.run_dir, args.output)
    except OSError as err:
        raise DtlError(f"cannot write the plot: {err}") from None
    print(f"wrote {path}")
    return 0
