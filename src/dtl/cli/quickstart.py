"""`dtl quickstart`: a thin verb over `dtl.quickstart`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dtl.cli import add_common, add_threads, add_verb, say_threads
from dtl.device import resolve_device
from dtl.errors import DtlError
from dtl.quickstart import RECIPE, VOCAB_SIZE, check_out_dir, check_vocab_size, quickstart

EXAMPLES = """examples:
  dtl quickstart                          # trains runs/demo (about 3-10 minutes on a 2-core CPU)
  dtl quickstart --out runs/demo2 --max-steps 1200
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
        help="the main job in one command: train a tiny model on the embedded corpus, offline",
        description="Clean the Wikipedia excerpt and SQuAD questions that ship inside DTL, "
        "train a BPE tokenizer on them, prepare Q&A-formatted data and train the tiny preset "
        "with the tuned CPU recipe. Needs no download and no flags; prints the next commands.",
        examples=EXAMPLES,
    )
    p.add_argument("--out", default="runs/demo", help="the run dir to create (default runs/demo)")
    steps = RECIPE["max_steps"]
    p.add_argument(
        "--max-steps", type=int, default=steps, help=f"optimizer steps (default {steps})"
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
    if args.max_steps < 1:
        raise DtlError(f"--max-steps must be a positive integer, got {args.max_steps}")
    # the library checks these again; here first, so a bad one stays a single line
    check_vocab_size(args.vocab_size)
    resolve_device(args.device)
    check_out_dir(Path(args.out))
    say_threads(args)
    result = quickstart(
        args.out,
        max_steps=args.max_steps,
        vocab_size=args.vocab_size,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if result.get("interrupted"):
        print(f"interrupted; continue with `dtl train --resume {args.out}`")
        return 130
    ppl = result.get("val_ppl")
    shown = f", val perplexity {ppl:.2f}" if ppl else ""
    minutes, checkpoint = result["seconds"] / 60, result["checkpoint"]
    print(f"done in {minutes:.1f} min: step {result['step']}{shown}; checkpoint {checkpoint}")
    print(NEXT_STEPS.format(run=args.out))
    return 0
