"""`dtl generate`, `dtl ask`, `dtl chat` and `dtl eval`: putting a trained model to work."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from dtl.cli import add_common, add_model_args, add_threads, load_model_args
from dtl.data.qa import format_qa, qa_prompt
from dtl.data.sources import detect_kind, iter_records
from dtl.errors import DtlError
from dtl.fileio import atomic_write_text
from dtl.generate.batch import fit_request
from dtl.generate.context import fits
from dtl.generate.evaluate import evaluate_lm, evaluate_squad
from dtl.generate.loop import Request
from dtl.generate.sampling import ASK_DEFAULTS, SamplingOptions, ask_options
from dtl.generate.text import stream_requests


def register(subparsers) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text",
        formatter_class=formatter,
        description="Sample a continuation of --prompt from a model, printed as it is generated.",
        epilog="examples:\n"
        "  dtl generate --model runs/tiny --prompt 'The history of' --max-new-tokens 80\n"
        "  dtl generate --model runs/tiny --prompt 'Once' --temperature 0   # greedy\n"
        "  dtl generate --model best_model.pt --prompt 'Hello' --top-p 0.9 --seed 1",
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads stdin)")
    _sampling_args(p, SamplingOptions(temperature=0.8, top_k=50, max_new_tokens=100))
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument(
        "--no-kv-cache", action="store_true", help="recompute the whole context every step"
    )
    add_threads(p)
    add_common(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser(
        "ask",
        help="answer a question with the Q&A template",
        formatter_class=formatter,
        description="Wrap the question in the Q&A template ('Question: ...\\nAnswer:') and print "
        "only the answer, which ends at end-of-text or where the model starts another "
        "'Question:' or 'Answer:' line. Greedy with repetition penalty "
        f"{ASK_DEFAULTS.repetition_penalty} unless told otherwise; the web page's Ask tab "
        "starts from the same settings (ASK_DEFAULTS).",
        epilog="examples:\n"
        '  dtl ask --model runs/qa "What is the capital of France?"\n'
        '  dtl ask --model runs/qa "Who were the Normans?" --repetition-penalty 1   # no penalty\n'
        '  dtl ask --model runs/qa "Who were the Normans?" --temperature 0.8 --seed 1',
    )
    add_model_args(p)
    p.add_argument("question", help="the question")
    _sampling_args(p, ASK_DEFAULTS)
    add_threads(p)
    add_common(p)
    p.set_defaults(func=cmd_ask)

    p = subparsers.add_parser(
        "chat",
        help="an interactive question-and-answer loop",
        formatter_class=formatter,
        description="Ask questions one after another; each answer streams as it is generated. "
        "Earlier questions and answers are given to the model as context until /reset. "
        "Type /help inside for the commands.",
        epilog="example:\n  dtl chat --model runs/qa --temperature 0.7",
    )
    add_model_args(p)
    _sampling_args(p, dataclasses.replace(ASK_DEFAULTS, max_new_tokens=128))
    add_threads(p)
    add_common(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser(
        "eval",
        help="perplexity / bits per byte, or SQuAD exact match and F1",
        formatter_class=formatter,
        description="Score a model on a file. Text (text, wikitext, a Wikipedia dump, articles "
        "JSONL): perplexity "
        "and bits per byte. Questions (squad, Q&A JSONL): each answered as `dtl ask` answers it "
        "(the same flags and defaults: greedy, repetition penalty "
        f"{ASK_DEFAULTS.repetition_penalty}, the Q&A stops), scored by exact match and F1 with "
        "the official SQuAD normalisation against all gold answers (unanswerable questions "
        "count as right only for an empty answer); the output says which settings it used.",
        epilog="examples:\n"
        "  dtl eval --model runs/tiny --data wiki.test.raw --kind wikitext --max-tokens 20000\n"
        "  dtl eval --model runs/qa --data squad-v2-dev-small.json --limit 100 --json",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="the file to score")
    p.add_argument(
        "--kind",
        choices=["text", "wikitext", "wikipedia", "squad", "jsonl"],
        help="the file's kind (default: from its name: .raw/.tokens wikitext, .json squad, "
        ".jsonl records, else text)",
    )
    p.add_argument("--limit", type=_positive, help="use only the first N documents or questions")
    p.add_argument("--max-tokens", type=_positive, help="text: score at most about N tokens")
    p.add_argument("--batch-size", type=_positive, default=8, help="rows per forward (default 8)")
    _sampling_args(p.add_argument_group("questions: how to answer (as dtl ask)"), ASK_DEFAULTS)
    p.add_argument("--predictions", help="questions: write each prediction to this JSONL file")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    add_threads(p)
    add_common(p)
    p.set_defaults(func=cmd_eval)


# ---------------------------------------------------------------------- arguments
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _sampling_args(p: argparse.ArgumentParser, defaults: SamplingOptions) -> None:
    """The sampling flags, defaulting to `defaults` (ask and chat: ASK_DEFAULTS)."""
    d = defaults
    p.add_argument("--max-new-tokens", type=_positive, default=d.max_new_tokens,
                   help=f"at most this many new tokens (default {d.max_new_tokens})")  # fmt: skip
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"0 = greedy, higher = more random (default {d.temperature})")  # fmt: skip
    p.add_argument("--top-k", type=int, default=d.top_k or 0,
                   help=f"sample from the k likeliest ({d.top_k or 0}; 0 = all)")  # fmt: skip
    p.add_argument("--top-p", type=float, default=d.top_p,
                   help="nucleus sampling: keep this probability mass")  # fmt: skip
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help="CTRL penalty for tokens already in the prompt or answer (1 = off; "
                   f"default {d.repetition_penalty})")  # fmt: skip
    p.add_argument("--no-repeat-ngram", type=int, default=d.no_repeat_ngram_size, metavar="N",
                   help="never repeat an N-token sequence of the prompt or answer (0 = off; "
                   f"default {d.no_repeat_ngram_size})")  # fmt: skip
    p.add_argument("--seed", type=int, help="same seed, same output")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable)")  # fmt: skip


def user_text(text: str, what: str) -> str:
    r"""`text` from the command line or stdin, made valid Unicode for the tokenizer.

    Python keeps bytes that are not UTF-8 as lone surrogates ("caf\udce9" for the latin-1
    bytes b"caf\xe9"), which no tokenizer takes; each becomes U+FFFD, with a note on stderr,
    the way a terminal shows such bytes.

    >>> user_text("caf\udce9?", "the question") == "caf\ufffd?"
    True
    """
    fixed = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    if fixed != text:
        print(f"note: {what} is not valid UTF-8; its undecodable bytes are replaced by U+FFFD",
              file=sys.stderr)  # fmt: skip
    return fixed


def _read_stdin() -> str:
    """All of stdin as text; bytes that are not UTF-8 survive to `user_text` (no crash)."""
    return sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")


def sampling_options(args) -> SamplingOptions:
    """The one `SamplingOptions` of a verb's flags (checked here, before the slow load)."""
    if args.top_k is not None and args.top_k < 0:
        raise DtlError(f"--top-k {args.top_k}: must be 0 (off) or a positive number of tokens")
    return SamplingOptions(
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(user_text(t, "--stop") for t in args.stop),
        no_repeat_ngram_size=args.no_repeat_ngram,
    )


def fitted_stream(model, tokenizer, prompt: str, opts: SamplingOptions, use_cache: bool = True,
                  prompt_ids: list[int] | None = None):  # fmt: skip
    """The text pieces of one prompt's completion, fitted to the model's context by the one
    rule (`fit_request`: max_new_tokens cut to the room the prompt leaves; a prompt that
    fills the context alone loses its oldest tokens), with a note on stderr saying what was
    cut. The prompt is tokenized once (not at all when its `prompt_ids` are given)."""
    request = Request([prompt], opts, prompt_ids=None if prompt_ids is None else [prompt_ids])
    note = fit_request(request, tokenizer, model.config.context).note()
    if note is not None:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return (c.text for c in stream_requests(model, tokenizer, [request], use_cache) if c.text)


def _print_stream(pieces, strip_leading: bool = False) -> str:
    """Print text pieces as they come; returns the whole text."""
    out = []
    for piece in pieces:
        if strip_leading and not out:
            piece = piece.lstrip()
            if not piece:
                continue
        out.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(out)


# ---------------------------------------------------------------------- generate / ask
def cmd_generate(args) -> int:
    prompt = user_text(_read_stdin() if args.prompt == "-" else args.prompt, "the prompt")
    opts = sampling_options(args)
    model, tokenizer = load_model_args(args)
    pieces = fitted_stream(model, tokenizer, prompt, opts, use_cache=not args.no_kv_cache)
    if args.echo:
        sys.stdout.write(prompt)
    _print_stream(pieces)
    return 0


def cmd_ask(args) -> int:
    args.question = user_text(args.question, "the question")
    if not args.question.strip():
        raise DtlError("the question is empty; ask something, e.g. dtl ask --model M 'Who?'")
    opts = ask_options(sampling_options(args))
    model, tokenizer = load_model_args(args)
    pieces = fitted_stream(model, tokenizer, qa_prompt(args.question), opts)
    _print_stream(pieces, strip_leading=True)
    return 0


# ---------------------------------------------------------------------- chat
CHAT_HELP = """commands:
  /help              this list
  /reset             forget the conversation so far
  /quit              leave (also /exit or Ctrl-D)
  /temp X            temperature (0 = greedy)
  /top-k N           sample from the N likeliest tokens (0 = all)
  /top-p X           nucleus sampling mass (1 = off)
  /max N             at most N new tokens per answer
  /penalty X         repetition penalty (1 = off)
  /ngram N           never repeat an N-token sequence (0 = off)
  /seed N            fix the seed (/seed off for random)
  /settings          show the current settings
Ctrl-C stops an answer that is being generated."""

_CHAT_SETTINGS = {  # command -> (option, parse)
    "/temp": ("temperature", float),
    "/temperature": ("temperature", float),
    "/top-k": ("top_k", lambda s: int(s) or None),
    "/top-p": ("top_p", lambda s: None if float(s) >= 1 else float(s)),
    "/max": ("max_new_tokens", int),
    "/penalty": ("repetition_penalty", float),
    "/ngram": ("no_repeat_ngram_size", int),
    "/seed": ("seed", lambda s: None if s == "off" else int(s)),
}


def chat_command(
    line: str, opts: SamplingOptions, history: list
) -> tuple[str | None, SamplingOptions]:
    """Apply one slash command to the chat state: (what to print, None = quit; the options)."""
    name, _, value = line.strip().partition(" ")
    value = value.strip()
    if name in ("/quit", "/exit"):
        return None, opts
    if name == "/help":
        return CHAT_HELP, opts
    if name == "/reset":
        history.clear()
        return "(conversation cleared)", opts
    if name == "/settings":
        shown = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
        return ", ".join(f"{k}={shown[k]}" for k in sorted(shown) if k != "stop"), opts
    if name not in _CHAT_SETTINGS:
        return f"unknown command {name}; /help lists them", opts
    key, parse = _CHAT_SETTINGS[name]
    try:
        new = parse(value)
        changed = dataclasses.replace(opts, **{key: new})  # checked as the flags are
    except (ValueError, TypeError, DtlError) as err:
        return f"{name} {value!r}: {err}", opts
    return f"{key} = {new}", changed


def cmd_chat(args) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input(); not on Windows)
    except ImportError:
        pass
    opts = ask_options(sampling_options(args))
    model, tokenizer = load_model_args(args)
    history: list[str] = []
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 reaches user_text, no crash
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"dtl chat: {args.model} ({model.num_parameters():,} parameters). /help for commands.")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        line = user_text(line, "the line")
        if not line.strip():
            continue
        if line.startswith("/"):
            reply, opts = chat_command(line, opts, history)
            if reply is None:
                return 0
            print(reply)
            continue
        prompt, ids, left_out = fit_chat_history(tokenizer, history, line, opts.max_new_tokens,
                                                 model.config.context)  # fmt: skip
        if left_out:
            print(f"note: the oldest {left_out} of {len(history)} earlier turns are left out so "
                  f"the question and {opts.max_new_tokens} new tokens fit the model's "
                  f"{model.config.context}-token context", file=sys.stderr, flush=True)  # fmt: skip
        pieces = fitted_stream(model, tokenizer, prompt, opts, prompt_ids=ids)
        sys.stdout.write("dtl> ")
        try:
            answer = _print_stream(pieces, strip_leading=True)
        except KeyboardInterrupt:
            print("\n(stopped)")
            continue
        history.append(format_qa(line, answer))


def fit_chat_history(
    tokenizer, history: list[str], question: str, max_new_tokens: int, context: int
) -> tuple[str, list[int], int]:
    """The chat's next prompt: the earlier turns (answered Q&A examples), then the question.
    The oldest turns are left out, whole, while the prompt and max_new_tokens do not fit the
    context (then the one rule, `fit_request`, fits the question alone). Returns the prompt,
    its token ids and how many turns were left out."""
    first = 0
    while True:
        prompt = "\n".join([*history[first:], qa_prompt(question)])
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
        if first == len(history) or fits(len(ids), max_new_tokens, context):
            return prompt, ids, first
        first += 1


# ---------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    if args.predictions and Path(args.predictions).is_dir():
        raise DtlError(f"--predictions {args.predictions}: is a directory; give a file name, "
                       f"e.g. {Path(args.predictions) / 'predictions.jsonl'}")  # fmt: skip
    if args.predictions and not Path(args.predictions).resolve().parent.is_dir():
        raise DtlError(f"--predictions {args.predictions}: its folder does not exist")
    kind = args.kind or detect_kind(args.data)
    if kind not in ("text", "wikitext", "wikipedia", "squad", "jsonl"):
        raise DtlError(f"{args.data}: eval reads text, wikitext, wikipedia, squad or jsonl "
                       f"files, not {kind}")  # fmt: skip
    options = {"unanswerable": ""} if kind == "squad" else {}
    records = iter_records(args.data, kind, **options)
    first = next(records, None)
    if first is None:
        raise DtlError(f"{args.data}: no records found in this {kind} file")
    answering = ask_options(sampling_options(args))
    model, tokenizer = load_model_args(args)
    progress = sys.stderr.isatty()

    def all_records():
        yield first
        yield from records

    if "question" in first:
        scores = evaluate_squad(model, tokenizer, all_records(), None, args.batch_size,
                                args.limit, progress, answering)  # fmt: skip
        predictions = scores.pop("predictions")
        if args.predictions:
            _write_jsonl(Path(args.predictions), predictions)
        scores = {"task": "qa", "data": args.data, **scores}
    else:
        texts = (r["text"] for i, r in enumerate(all_records()) if not args.limit or i < args.limit)
        scores = {"task": "lm", "data": args.data,
                  **evaluate_lm(model, tokenizer, texts, args.batch_size, args.max_tokens,
                                progress)}  # fmt: skip
    scores["dtype"] = args.dtype_used  # the format the figures were computed in
    if args.json:
        print(json.dumps(scores))
    elif scores["task"] == "qa":
        print(f"{scores['count']} questions: exact match {scores['exact_match']:.2f}, "
              f"F1 {scores['f1']:.2f} ({args.dtype_used})")  # fmt: skip
        print(f"  answered as dtl ask: {describe_answering(scores['settings'])}")
        for group, label in (("has_ans", "answerable"), ("no_ans", "unanswerable")):
            if scores.get(f"{group}_count"):
                print(f"  {label} ({scores[f'{group}_count']}): exact match "
                      f"{scores[f'{group}_exact_match']:.2f}, F1 {scores[f'{group}_f1']:.2f}")  # fmt: skip
    else:
        print(f"{scores['tokens']:,} tokens ({scores['bytes']:,} bytes, {scores['documents']} "
              f"documents): perplexity {scores['perplexity']:.3f}, bits per byte "
              f"{scores['bits_per_byte']:.4f} ({args.dtype_used})")  # fmt: skip
    return 0


def describe_answering(settings: dict) -> str:
    """`evaluate_squad`'s "settings" in a line: how the scored answers were generated.

    >>> describe_answering(answer_settings(ask_options()))  # doctest: +SKIP
    "greedy, repetition penalty 1.3, at most 64 new tokens, stop at '\\nQuestion:', ..."
    """
    s = settings
    if s["temperature"] == 0:
        said = ["greedy"]
    else:
        said = [f"temperature {s['temperature']:g}"]
        said += [f"top-k {s['top_k']}"] if s["top_k"] else []
        said += [f"top-p {s['top_p']:g}"] if s["top_p"] is not None else []
        said += [f"seed {s['seed']}"] if s["seed"] is not None else []
    if s["repetition_penalty"] != 1.0:
        said.append(f"repetition penalty {s['repetition_penalty']:g}")
    if s["no_repeat_ngram_size"]:
        said.append(f"no repeated {s['no_repeat_ngram_size']}-grams")
    said.append(f"at most {s['max_new_tokens']} new tokens")
    stops = ", ".join(repr(t) for t in s["stop"])
    return ", ".join(said) + f", stop at end-of-text or {stops}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows via a temporary file, then rename: never a half-written file."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
