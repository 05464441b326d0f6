"""`dtl quickstart`: the main job in one command, offline, on the corpus inside the package.

>>> result = quickstart("runs/demo")        # doctest: +SKIP
>>> result["checkpoint"], result["val_ppl"]  # doctest: +SKIP
('runs/demo/checkpoints/step-600', 301.7)

Every stage is the one a user runs by hand, in the spec's order (see the README's Usage):
  1. clean    the embedded Wikipedia dump excerpt and SQuAD questions -> records JSONL
              (RUN/corpus/*.jsonl, the same as `dtl extract`)
  2. BPE      a byte-level BPE trained on the cleaned text (RUN/tokenizer, `dtl tokenizer train`)
  3. prepare  articles as text followed by their Q&A pairs, SQuAD as Q&A pairs, packed into
              rows of 128 tokens, 10% of the documents held out (RUN/data, `dtl prepare`)
  4. train    the `tiny` preset with the README's tuned CPU recipe (RUN/, `dtl train`)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from dtl.corpus import corpus_files
from dtl.data.extract import extract
from dtl.data.prepare import prepare
from dtl.data.sources import iter_records
from dtl.device import resolve_device
from dtl.errors import DtlError
from dtl.run_dir import CONFIG_FILE, DATA_DIR
from dtl.tokenizer import check_vocab_size, train_tokenizer
from dtl.train import TrainConfig, train
from dtl.train.config import prepare_length
from dtl.train.setup import check_out_not_a_file

# The tuned CPU recipe for `tiny` (README, docs/benchmarks.md), at lr 2e-3: on this corpus
# 3e-3 sat on the unigram plateau (loss ~7.3) for 400 of 600 steps at seed 0.
RECIPE: dict[str, Any] = {
    "preset": "tiny",
    "seq_len": 128,
    "batch_size": 16,
    "max_steps": 1200,
    "lr": 2e-3,
    "warmup_steps": 100,
    "eval_every": 300,
    "save_every": 300,
}
VOCAB_SIZE = 8192
VAL_FRACTION = 0.1
STAGE_DIRS = {"corpus", "tokenizer", DATA_DIR}  # what stages 1-3 write before the run starts


def check_out_dir(run_dir: Path) -> None:
    """Refuse a folder that already holds anything: a demo never overwrites a user's files."""
    check_out_not_a_file(run_dir)
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if names:
        if CONFIG_FILE in names:
            hint = f"it holds a run: continue it with `dtl train --resume {run_dir}`"
        elif names <= STAGE_DIRS:
            hint = f"an unfinished quickstart: delete it (rm -r {run_dir}) to start again"
        else:
            hint = "it is not a dtl run dir"
        raise DtlError(
            f"--out {run_dir} is not empty ({hint}); or choose a new --out, e.g. runs/demo2 "
            "(nothing was changed)"
        )


def clean_corpus(out_dir: Path, progress: bool = False) -> list[Path]:
    """Stage 1: each embedded source -> `out_dir/<name>.jsonl` of clean records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in corpus_files():
        out = out_dir / (source.name.split(".")[0] + ".jsonl")
        summary = extract(source, out, progress=progress)
        records = f"{summary['records']:,} records ({summary['kind']})"
        print(f"  {source.name}: {records} -> {out}", flush=True)
        paths.append(out)
    return paths


def records_text(records_files: list[Path], out: Path) -> Path:
    """The text a tokenizer learns from: every article text, question and answer, one a line."""
    with open(out, "w", encoding="utf-8") as f:
        for path in records_files:
            for rec in iter_records(path, "jsonl"):
                for key in ("text", "question", "answer"):
                    if rec.get(key):
                        f.write(str(rec[key]) + "\n")
    return out


def quickstart(
    out: str | os.PathLike = "runs/demo",
    *,
    max_steps: int = RECIPE["max_steps"],
    vocab_size: int = VOCAB_SIZE,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    **train_overrides: Any,
) -> dict[str, Any]:
    """Clean, tokenize and train on the embedded corpus into the run dir `out`; the train summary.

    `train_overrides` are `dtl train` settings (e.g. d_model=32 for a smaller model).
    """
    started = time.perf_counter()
    run_dir = Path(out)
    # Every setting is checked before anything is written.
    check_vocab_size(vocab_size)
    resolve_device(device)
    settings = {"max_steps": max_steps, "device": device, "seed": seed, "progress": progress}
    cfg = train_config(run_dir, **settings, **train_overrides)
    check_out_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(
        "1/4 clean: the embedded Wikipedia excerpt and SQuAD questions (CC BY-SA, "
        "see dtl/corpus/NOTICE.md)",
        flush=True,
    )
    records = clean_corpus(run_dir / "corpus", progress=progress)
    print(
        f"2/4 tokenizer: a byte-level BPE of {vocab_size:,} tokens on the cleaned text", flush=True
    )
    train_bpe(records, run_dir, vocab_size)
    print("3/4 prepare: articles as text then Q&A pairs, SQuAD as Q&A pairs, packed", flush=True)
    prepare_records(records, run_dir, prepare_length(cfg), seed=seed, progress=progress)
    print(f"4/4 train: the {RECIPE['preset']} preset, {max_steps} steps", flush=True)
    result = train(cfg)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["run_dir"] = str(run_dir)
    return result


def train_config(run_dir: Path, **settings: Any) -> TrainConfig:
    """The RECIPE with `settings` over it, on RUN/data into RUN, checked; a run shorter than
    the recipe's evaluates and saves at its end."""
    settings = {**RECIPE, **settings}
    for key in ("save_every", "eval_every"):
        settings[key] = min(int(settings[key]), int(settings["max_steps"]))
    cfg = TrainConfig.from_dict({**settings, "data": str(run_dir / DATA_DIR), "out": str(run_dir)})
    cfg.validate()
    return cfg


def train_bpe(records: list[Path], run_dir: Path, vocab_size: int) -> Path:
    """Stage 2: a byte-level BPE learned from the cleaned records -> RUN/tokenizer."""
    text = records_text(records, run_dir / "corpus" / ".tokenizer-text.txt")
    try:
        train_tokenizer([text], vocab_size, run_dir / "tokenizer", show_progress=False)
    finally:
        text.unlink(missing_ok=True)
    print(f"  -> {run_dir / 'tokenizer'}", flush=True)
    return run_dir / "tokenizer"


def prepare_records(
    records: list[Path], run_dir: Path, max_length: int, seed: int, progress: bool
) -> dict[str, Any]:
    """Stage 3: articles as text then their Q&A pairs, SQuAD as Q&A pairs, packed into rows
    of `max_length` with 10% of the documents held out -> RUN/data; prepare's summary."""
    summary = prepare(
        records,
        run_dir / DATA_DIR,
        tokenizer=run_dir / "tokenizer",
        kind="jsonl",
        max_length=max_length,
        mode="pack",
        val_fraction=VAL_FRACTION,
        seed=seed,
        articles_as="both",
        progress=progress,
    )
    tr, va = summary["train"], summary["val"]
    print(
        f"  train {tr['tokens']:,} tokens ({tr['rows']:,} rows), val {va['tokens']:,} tokens "
        f"({va['rows']:,} rows), {summary['qa_examples']:,} Q&A pairs -> {run_dir / DATA_DIR}",
        flush=True,
    )
    return summary
