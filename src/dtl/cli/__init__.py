"""The `dtl` command line: a thin layer over the library.

Each verb lives in `dtl/cli/<group>.py`, which adds its sub-parser in `register()` and
calls library functions; nothing here knows how a model trains or a page is served.
User mistakes raise `DtlError` and come out as one line on stderr with exit code 2
(`--debug` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from dtl.errors import DtlError
from dtl.fileio import DiskFullError, is_disk_full

# One module per group of verbs, in the order `dtl --help` lists them, with the verbs each
# registers: `dtl VERB ...` imports VERB's module alone, so a verb that runs no model (`dtl
# extract`) never loads torch, which the others' modules import (tests/test_lazy_imports.py
# checks this table against what the modules register).
COMMAND_MODULES = {
    "dtl.cli.quickstart": ("quickstart",),
    "dtl.cli.info": ("info",),
    "dtl.cli.data": ("tokenizer", "extract", "prepare"),
    "dtl.cli.train": ("train", "plot"),
    "dtl.cli.generate": ("generate", "ask", "chat", "eval"),
    "dtl.cli.serve": ("serve",),
    "dtl.cli.export": ("export",),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `dtl` parser: every verb's, or (given the command line) the named verb's only.

    >>> args = build_parser(["extract", "dump.xml.bz2"]).parse_args(["extract", "dump.xml.bz2"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(
        prog="dtl",
        description="Train decoder-only transformer language models from scratch, then "
        "generate, answer questions, evaluate and serve them.",
        epilog="Run `dtl VERB --help` for a verb's options and examples.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="VERB")
    verb = verb_of(argv or [])
    modules = [m for m, verbs in COMMAND_MODULES.items() if verb in verbs] or COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def verb_of(argv: list[str]) -> str | None:
    """The verb of a `dtl` command line: the top level takes no option with a value, so the
    first word is the verb (if any)."""
    return next((a for a in argv if not a.startswith("-")), None)


def add_verb(
    subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """A verb's parser: `help` in `dtl --help`, `description` and then `examples`, printed
    as written, in `dtl VERB --help`.

    >>> p = add_verb(sub, "info", help="...", description="...", examples=EXAMPLES)  # doctest: +SKIP
    """
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every verb accepts (so `dtl VERB --debug` works as well as `dtl --debug VERB`)."""
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
    )


def add_threads(parser: argparse.ArgumentParser) -> None:
    """`--threads N` for a verb that runs a model on the CPU; `main` applies it before the
    verb runs, so every verb picks its default in one place, and the verb calls `say_threads`
    once its arguments are checked (a bad one stays a single line)."""
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for the model (default: one per usable core, idle threads sleeping "
        "so a busy machine costs little; under torchrun each process gets its share)",
    )
    parser.set_defaults(apply_threads=True)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--tokenizer`, `--device` and `--dtype`: what every verb that loads a model
    takes (generate, ask, chat, eval, serve); `load_model_args` loads it."""
    parser.add_argument(
        "--model", required=True, help="a run dir, a checkpoint dir, or a legacy DTL .pt file"
    )
    parser.add_argument("--tokenizer", help="override the model's tokenizer: 'gpt2' or a directory")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default auto: cuda, else mps, "
                        "else cpu)")  # fmt: skip
    parser.add_argument("--dtype", default="auto", metavar="{auto,fp32,bf16,int8}",
                        help="the format the model runs in (default auto: int8 on a CPU with "
                        "native bf16 (AVX512-BF16/AMX), measured fastest there, else fp32; "
                        "int8: dynamically quantized linear layers, CPU only; fp32: exact). "
                        "Logits are always fp32; "
                        "docs/benchmarks.md has the speed and quality of each")  # fmt: skip


def load_model_args(args: argparse.Namespace, device=None):
    """(model, tokenizer) of `add_model_args`' flags, on `device` (default: --device) and
    in --dtype's format (`dtl.model.dtype`), after the thread line (`say_threads`) and a line
    saying the format (stderr); `args.dtype_used` is set to it.

    >>> model, tokenizer = load_model_args(args)  # doctest: +SKIP
    """
    from dtl.device import resolve_device
    from dtl.model.dtype import dtype_line, resolve_inference_dtype
    from dtl.model.store import load_model

    if device is None:
        device = resolve_device(args.device)
    asked = getattr(args, "dtype", "fp32")
    args.dtype_used = resolve_inference_dtype(asked, device)
    say_threads(args)
    if os.environ.get("RANK", "0") == "0":
        print(dtype_line(asked, args.dtype_used), file=sys.stderr, flush=True)
    return load_model(args.model, device=device, tokenizer=args.tokenizer, dtype=args.dtype_used)


def say_threads(args: argparse.Namespace) -> None:
    """Print the thread choice `main` applied, as the verb's first log line (stderr; once, and
    only on the first torchrun rank)."""
    choice = getattr(args, "thread_choice", None)
    if choice is not None and os.environ.get("RANK", "0") == "0":
        print(choice.line(), file=sys.stderr, flush=True)
    args.thread_choice = None


def _verb_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The innermost sub-parser `args` went through (`dtl tokenizer train` -> its parser)."""
    while True:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, actions[0].dest, None) if actions else None
        if name not in (actions[0].choices if actions else {}):
            return parser
        parser = actions[0].choices[name]


def _reject_unknown(parser: argparse.ArgumentParser, args, extras: list[str]) -> None:
    """Unknown arguments are the verb's error, printed with the verb's usage (argparse alone
    reports them with the top-level usage), with the nearest real flag as a hint."""
    verb = _verb_parser(parser, args)
    message = f"unrecognized arguments: {' '.join(extras)}"
    flags = [f for a in verb._actions for f in a.option_strings if f.startswith("--")]
    for extra in extras:
        close = difflib.get_close_matches(extra.split("=")[0], flags, n=1, cutoff=0.75)
        if extra.startswith("-") and close:
            message += f" (did you mean {close[0]}?)"
            break
    verb.error(message)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "torch" not in sys.modules:  # the verb's OpenMP wait policy, before its module loads torch
        from dtl.threads import set_wait_policy

        set_wait_policy(verb=verb_of(argv))
    parser = build_parser(argv)
    args, extras = parser.parse_known_args(argv)
    if extras:
        _reject_unknown(parser, args, extras)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "apply_threads", False):
            from dtl.threads import apply_threads

            args.thread_choice = apply_threads(args.threads, say=False)
        result = args.func(args)
    except DtlError as err:
        if getattr(args, "debug", False):
            raise
        print(f"dtl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dtl info --json | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except OSError as err:  # a full disk where no writer named its file (tokenizer train)
        if getattr(args, "debug", False) or not is_disk_full(err):
            raise
        print(
            f"dtl {args.command}: error: {DiskFullError(err.filename or 'a file')}", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(f"dtl {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
