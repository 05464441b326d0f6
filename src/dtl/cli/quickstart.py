"""`dtl quickstart`: a thin verb over `dtl.quickstart`."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  dtl quickstart                          # trains runs/demo (about 3-10 minutes on a 2-core CPU)
  dtl quickstart --out runs/demo2 --max-steps 1200
then:
  dtl ask --model runs/demo "What is anarchism?"
  dtl serve --model runs/demo
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from dtl.cli import add_common
    from dtl.quickstart import RECIPE, VOCAB_SIZE

    p = subparsers.add_parser(
        "quickstart",
        help="the main job in one command: train a tiny model on the embedded corpus, offline",
        description="Clean the Wikipedia excerpt and SQuAD questions that ship inside DTL, "
        "train a BPE tokenizer on them, prepare Q&A-formatted data and train the tiny preset "
        "with the tuned CPU recipe. Needs no download and no flags; prints the next commands.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="the run dir to create (default runs/demo)")
    p.add_argument("--max-steps", type=int, default=RECIPE["max_steps"],
                   help=f"optimizer steps (default {RECIPE['max_steps']})")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE,
                   help=f"BPE vocabulary (default {VOCAB_SIZE:,})")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights and order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common(p)
    p.set_defaults(func=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> int:
    from dtl.errors import DtlError
    from dtl.quickstart import quickstart

    if args.max_steps < 1:
        raise DtlError(f"--max-steps must be a positive integer, got {args.max_steps}")
    result = quickstart(args.out, max_steps=args.max_steps, vocab_size=args.vocab_size,
                        device=args.device, seed=args.seed,
                        progress=not args.no_progress and sys.stderr.isatty())  # fmt: skip
    if result.get("interrupted"):
        print(f"interrupted; continue with `dtl train --resume {args.out}`")
        return 130
    ppl = result.get("val_ppl")
    shown = f", val perplexity {ppl:.2f}" if ppl else ""
    print(f"done in {result['seconds'] / 60:.1f} min: step {result['step']}{shown}; "
          f"checkpoint {result['checkpoint']}")  # fmt: skip
    run = args.out
    print("next:\n"
          f'  dtl ask --model {run} "What is anarchism?"\n'
          f'  dtl generate --model {run} --prompt "Aristotle was" --top-k 50 --seed 0\n'
          f"  dtl chat --model {run}\n"
          f"  dtl serve --model {run}              # the web page and an OpenAI-compatible API\n"
          f"  dtl plot {run}                       # {run}/loss.png")  # fmt: skip
    return 0
