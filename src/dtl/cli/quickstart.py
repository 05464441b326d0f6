"""`dtl quickstart`: a thin verb over `dtl.quickstart`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dtl.cli import add_common, add_threads, add_verb, say_threads
from dtl.device import resolve_device
from dtl.errors import DtlError
from dtl.quickstart import (
    FINETUNE,
    PRETRAIN_DIR,
    RECIPE,
    VOCAB_SIZE,
    check_out_dir,
    check_vocab_size,
    quickstart,
)
from dtl.train.config import parse_max_time

EXAMPLES = """examples:
  dtl quickstart                          # runs/demo (about 4 minutes on two free cores)
  dtl quickstart --out runs/demo2 --max-steps 1200 --finetune-steps 400
  dtl quickstart --out runs/demo10 --max-time 10   # pretrain for 10 minutes
then:
  dtl ask --model runs/demo "What is anarchism?"
  dtl serve --model runs/demo
"""
# What to run next, printed after a finished quickstart; {run} is its --out.
NEXT_STEPS = """next:
  dtl ask --model {run} "What is anarchism?"
  dtl generate --model {run} --prompt "Aristotle was" --top-k 50 --seed 0
  dtl chat --model {run}
  dtl serve --model {run}              # the web page and an OpenAI-compatible API
  dtl plot {run}                       # {run}/loss.png"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_verb(
        subparsers,
        "quickstart",
        help="the main job in one command: pretrain a tiny model on the embedded articles, "
        "fine-tune it on Q&A pairs, offline",
        description="Clean the Wikipedia excerpt and SQuAD questions that ship inside DTL, "
        "train a BPE tokenizer on them, pretrain the tiny preset on the articles (OUT/pretrain), "
        "then fine-tune it with --init-from on Q&A pairs, answer-only loss (OUT). Prints the val "
        "perplexity of both stages and SQuAD EM/F1 on held-out questions before and after the "
        "fine-tune. Needs no download and no flags; prints the next commands.",
        examples=EXAMPLES,
    )
    p.add_argument("--out", default="runs/demo", help="the run dir to create (default runs/demo)")
    steps = RECIPE["max_steps"]
    p.add_argument(
        "--max-steps",
        type=int,
        help=f"pretraining steps (default {steps}; with --max-time: none unless given, then the "
        "pretraining stops at whichever comes first)",
    )
    p.add_argument(
        "--max-time",
        metavar="MINUTES",
        help="pretrain for this many minutes of training (dtl train --max-time: evaluation and "
        "saving not counted, the lr schedule follows the time) instead of a number of steps; "
        "the fine-tune keeps its --finetune-steps",
    )
    ft_steps = FINETUNE["max_steps"]
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=ft_steps,
        help=f"fine-tuning steps on the Q&A pairs (default {ft_steps})",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=VOCAB_SIZE,
        help=f"BPE vocabulary (default {VOCAB_SIZE:,})",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights and order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads(p)
    add_common(p)
    p.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    for flag, value in (("--max-steps", args.max_steps), ("--finetune-steps", args.finetune_steps)):
        if value is not None and value < 1:
            raise DtlError(f"{flag} must be a positive integer, got {value}")
    max_time = parse_max_time(args.max_time)  # a bad value: one line, before anything runs
    # the library checks these again; here first, so a bad one stays a single line
    check_vocab_size(args.vocab_size)
    resolve_device(args.device)
    check_out_dir(Path(args.out))
    say_threads(args)
    result = quickstart(
        args.out,
        max_steps=args.max_steps,
        finetune_steps=args.finetune_steps,
        max_time=max_time,
        vocab_size=args.vocab_size,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if result.get("interrupted"):
        print(f"interrupted; continue with `dtl train --resume {result['resume']}`")
        if "finetune" not in result:  # stopped while pretraining: the second stage is to come
            print(
                f"then fine-tune: dtl train --init-from {args.out}/{PRETRAIN_DIR} --data "
                f"{args.out}/data --out {args.out} --max-steps {args.finetune_steps} "
                f"--lr {FINETUNE['lr']} --warmup-steps {FINETUNE['warmup_steps']}"
            )
        return 130
    print(summary_table(result, args.out))
    print(NEXT_STEPS.format(run=args.out))
    return 0


def summary_table(result: dict, out: str) -> str:
    """The two stages side by side: val perplexity (each on its own val split), SQuAD EM/F1
    on the held-out questions, and the time each stage took."""
    pre, ft, squad, sec = result["pretrain"], result["finetune"], result["squad"], result["seconds"]

    def ppl(summary: dict) -> str:
        return f"{summary['val_ppl']:.2f}" if summary.get("val_ppl") else "-"

    n = result["held_out_questions"]
    rows = [
        f"{'':34}{'val ppl':>9}{'SQuAD EM':>10}{'F1':>7}{'time':>8}",
        f"{'1 pretrain (articles)    ' + PRETRAIN_DIR + '/':34}{ppl(pre):>9}"
        f"{squad['before']['exact_match']:>10.1f}{squad['before']['f1']:>7.1f}"
        f"{sec['pretrain']:>7.0f}s",
        f"{'2 fine-tune (Q&A pairs)  ./':34}{ppl(ft):>9}"
        f"{squad['after']['exact_match']:>10.1f}{squad['after']['f1']:>7.1f}"
        f"{sec['finetune']:>7.0f}s",
    ]
    notes = (
        f"val ppl: stage 1 on held-out article text, stage 2 on held-out answers (answer-only "
        f"loss); EM/F1 on {n} held-out SQuAD questions, asked without their passage and answered "
        f"as `dtl ask` answers them by default.\n"
        f"done in {sec['total'] / 60:.1f} min (prepare {sec['prepare']:.0f}s, evaluate "
        f"{sec['evaluate']:.0f}s); the fine-tuned model is {result['checkpoint']}, the "
        f"pretrained one {out}/{PRETRAIN_DIR}"
    )
    return "\n".join(rows) + "\n" + notes
