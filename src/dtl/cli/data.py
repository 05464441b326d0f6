"""`dtl tokenizer train`, `dtl extract`, `dtl prepare`: thin verbs over `dtl.tokenizer` and `dtl.data`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dtl.cli import add_common, add_verb
from dtl.data.extract import extract
from dtl.data.qa import QA_TEMPLATE
from dtl.data.sources import detect_kind
from dtl.errors import DtlError
from dtl.model.config import DEFAULT_PRESET, preset_context

KINDS_HELP = "wikipedia, wikitext, squad, jsonl, text (default: from the file name)"

TOKENIZER_EXAMPLES = """examples:
  dtl tokenizer train corpus.txt --vocab-size 8192 -o tok-8k
  dtl tokenizer train ../shared/data/wikitext-2-raw/wiki.test.raw --vocab-size 4096 -o tok-4k
  dtl prepare corpus.txt -o data/corpus --tokenizer tok-8k
"""

EXTRACT_EXAMPLES = """examples:
  dtl extract enwiki-latest-pages-articles1.xml.bz2 -o wiki.jsonl
  dtl extract enwiki-latest-pages-articles-multistream.xml.bz2 -o wiki.jsonl   # its index beside it
  dtl extract dumps/enwiki-parts/ -o wiki.jsonl --processes 16     # a folder of parts
  dtl extract wiki.train.raw --kind wikitext -o wt.jsonl
  dtl extract train-v2.0.json -o squad.jsonl --unanswerable "unanswerable"
  dtl extract notes.txt --split blank -o notes.jsonl
  dtl extract hf:squad -o squad.jsonl            # needs the network and pip install 'dtl[datasets]'
"""

PREPARE_EXAMPLES = """examples:
  dtl prepare wiki.test.raw -o data/wt2 --max-length 256            # packed LM text
  dtl prepare squad.json -o data/squad --answer-only-loss           # padded Q&A rows
  dtl prepare enwiki.xml.bz2 -o data/wiki-qa --articles-as qa       # articles -> Q&A pairs
  dtl prepare records.jsonl -o data/mine --tokenizer tok-8k --preset tiny
"""

# Help texts too long for their add_argument line.
MODE_HELP = {
    "pack": "join documents with end-of-text, cut into rows (default for plain text)",
    "pad": "one example per row, right-padded (default for Q&A)",
}
ARTICLES_AS_HELP = (
    "articles as plain LM text (default), as Q&A pairs by the documented rule, or both (the "
    "text, then its pairs; packed by default)"
)
VAL_FRACTION_HELP = (
    "share held out for val (0.05): whole documents, or each document's tail when there are too few"
)
SOURCE_HELP = {
    "unanswerable": "SQuAD: keep unanswerable questions with this answer (default: skip them)",
    "field": "JSONL: read our field from theirs, e.g. --field question=q (repeatable)",
    "split": "text: one document per file (default) or per blank-line-separated block",
    "detokenize": "wikitext: undo ' @-@ ' and spaces before punctuation (default: .tokens "
    "files only)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_tokenizer(subparsers)
    _register_extract(subparsers)
    _register_prepare(subparsers)


def _register_tokenizer(subparsers: argparse._SubParsersAction) -> None:
    tok = subparsers.add_parser("tokenizer", help="train a byte-level BPE on your files")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = add_verb(
        tok_sub,
        "train",
        help="train a byte-level BPE (GPT-2's algorithm) on text files",
        description="Learn a byte-level BPE vocabulary from your files with the tokenizers "
        "library, so a small model can use e.g. 8k tokens instead of GPT-2's 50,257.",
        examples=TOKENIZER_EXAMPLES,
    )
    train.add_argument("files", nargs="+", help="UTF-8 text files")
    train.add_argument(
        "--vocab-size", type=int, required=True, help="tokens in the vocabulary (e.g. 8192)"
    )
    train.add_argument(
        "-o", "--out", required=True, help="folder to write vocab.json + merges.txt into"
    )
    train.add_argument("--min-frequency", type=int, default=2, help="a merge must occur this often")
    train.add_argument(
        "--force", action="store_true", help="replace what -o already holds (e.g. a tokenizer)"
    )
    add_common(train)
    train.set_defaults(func=run_tokenizer_train)
    add_common(tok)
    tok.set_defaults(func=lambda args: _missing_action(tok))


def _register_extract(subparsers: argparse._SubParsersAction) -> None:
    ext = add_verb(
        subparsers,
        "extract",
        help="a source (Wikipedia dump, WikiText, SQuAD, JSONL, text) -> clean records JSONL",
        description="Stream a source into one JSON record a line: {title, text} for articles, "
        "{question, answer, context?, title?} for Q&A pairs.",
        examples=EXTRACT_EXAMPLES,
    )
    ext.add_argument(
        "inputs",
        nargs="+",
        metavar="input",
        help="the source file, or hf:NAME (wikitext-2, wikitext-103, squad, squad_v2); a "
        "Wikipedia dump may be several parts or a folder of them",
    )
    ext.add_argument("-o", "--out", required=True, help="records JSONL to write ('-' for stdout)")
    _add_source_flags(ext)
    ext.add_argument(
        "--index",
        metavar="PATH",
        help="wikipedia: the multistream dump's index when it is not beside it (X-multistream-"
        "index.txt.bz2), or 'none' to read the dump as one stream",
    )
    ext.add_argument(
        "--force",
        action="store_true",
        help="wikipedia: start over instead of continuing a stopped run into -o",
    )
    ext.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    add_common(ext)
    ext.set_defaults(func=run_extract)


def _register_prepare(subparsers: argparse._SubParsersAction) -> None:
    prep = add_verb(
        subparsers,
        "prepare",
        help="sources or records -> tokenized train/val shards + meta.json",
        description="Clean (if raw), format, tokenize and split the inputs into a data dir for "
        "dtl train: train.bin / val.bin token shards, meta.json and the tokenizer's files.",
        examples=PREPARE_EXAMPLES,
    )
    prep.add_argument("inputs", nargs="+", help="source files or records.jsonl")
    prep.add_argument("-o", "--out", required=True, help="the data dir to write")
    prep.add_argument(
        "--tokenizer", default="gpt2", help="gpt2 (default) or a dir from dtl tokenizer train"
    )
    prep.add_argument(
        "--gpt2-dir",
        help="another copy of GPT-2's encoder.json + vocab.bpe (else $DTL_GPT2_DIR, else the "
        "copy shipped with dtl)",
    )
    prep.add_argument(
        "--max-length",
        type=int,
        help=f"tokens per row (default: the --preset's max_seq_length, {preset_context()} for "
        f"{DEFAULT_PRESET}, the preset dtl train uses by default)",
    )
    prep.add_argument(
        "--preset",
        help="check --max-length against this model preset's max_seq_length (its default)",
    )
    mode = prep.add_mutually_exclusive_group()
    for name, text in MODE_HELP.items():
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name, help=text)
    prep.add_argument(
        "--answer-only-loss", action="store_true", help="Q&A: no loss on the question tokens"
    )
    prep.add_argument(
        "--articles-as", choices=("text", "qa", "both"), default="text", help=ARTICLES_AS_HELP
    )
    prep.add_argument(
        "--template", help="Q&A template with {question} and {answer} (default: the spec's)"
    )
    prep.add_argument("--val-fraction", type=float, default=0.05, help=VAL_FRACTION_HELP)
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_source_flags(prep)
    add_common(prep)
    prep.set_defaults(func=run_prepare)


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say how to read a source, shared by extract and prepare."""
    p.add_argument("--kind", help=KINDS_HELP)
    p.add_argument("--unanswerable", metavar="TEXT", help=SOURCE_HELP["unanswerable"])
    p.add_argument(
        "--field", action="append", default=[], metavar="OURS=THEIRS", help=SOURCE_HELP["field"]
    )
    p.add_argument("--split", choices=("file", "blank"), default=None, help=SOURCE_HELP["split"])
    p.add_argument(
        "--detokenize", action="store_true", default=None, help=SOURCE_HELP["detokenize"]
    )
    p.add_argument(
        "--processes", type=int, help="wikipedia: cleaning processes (default: all cores)"
    )
    p.add_argument(
        "--keep-disambiguation", action="store_true", help="wikipedia: keep disambiguation pages"
    )


def _source_options(args: argparse.Namespace, kind: str) -> dict:
    options: dict = {}
    if kind == "squad" and args.unanswerable is not None:
        options["unanswerable"] = args.unanswerable
    if kind == "jsonl" and args.field:
        fields = {}
        for item in args.field:
            ours, sep, theirs = item.partition("=")
            if not sep or not ours or not theirs:
                raise DtlError(
                    f"--field {item!r} must look like OURS=THEIRS, e.g. --field question=q"
                )
            fields[ours] = theirs
        options["fields"] = fields
    if kind == "wikitext" and args.detokenize:
        options["detokenize"] = True
    if kind == "text" and args.split:
        options["split"] = args.split
    if kind == "wikipedia":
        if args.processes is not None:
            if args.processes < 1:
                raise DtlError(f"--processes {args.processes} must be at least 1")
            options["processes"] = args.processes
        options["keep_disambiguation"] = args.keep_disambiguation
    return options


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from dtl.tokenizer import train_tokenizer  # here: `dtl extract` loads neither tokenizers

    started = time.perf_counter()
    tok = train_tokenizer(
        args.files,
        args.vocab_size,
        args.out,
        min_frequency=args.min_frequency,
        show_progress=sys.stderr.isatty(),
        overwrite=args.force,
    )
    seconds = time.perf_counter() - started
    print(
        f"trained a {tok.vocab_size:,}-token byte-level BPE (end-of-text = {tok.eos_id}) in "
        f"{seconds:.1f}s -> {args.out}"
    )
    if tok.vocab_size < args.vocab_size:
        print(
            f"note: only {tok.vocab_size:,} of the {args.vocab_size:,} tokens asked for: the text "
            f"has no more pairs seen --min-frequency {args.min_frequency} times; give more text "
            f"or lower --min-frequency",
            file=sys.stderr,
        )
    return 0


def run_extract(args: argparse.Namespace) -> int:
    several = len(args.inputs) > 1 or any(Path(p).is_dir() for p in args.inputs)
    kind = args.kind or ("wikipedia" if several else detect_kind(args.inputs[0]))
    options = _source_options(args, kind)
    if kind == "wikipedia":
        options.update(index=args.index, force=args.force)
    elif args.index or args.force:
        raise DtlError(f"--index and --force are for Wikipedia dumps, not --kind {kind}")
    source = args.inputs if several else args.inputs[0]
    progress = False if args.no_progress else True
    summary = extract(source, args.out, kind, progress=progress, **options)
    out = sys.stderr if args.out == "-" else sys.stdout
    print(_extract_line(summary), file=out)
    return 0


def _extract_line(s: dict) -> str:
    skipped = _skipped(s.get("skipped", {}))
    line = f"{s['records']:,} records ({s['kind']}) in {s['seconds']:.1f}s -> {s['out']}"
    return line + (f"; skipped {skipped}" if skipped else "")


def run_prepare(args: argparse.Namespace) -> int:
    from dtl.data.prepare import prepare  # here: it loads torch, which `dtl extract` never needs

    # --preset is a limit to check against; without it, rows of the default preset's context
    # (what `dtl train` trains by default), so `dtl prepare` then `dtl train` fit together
    model_limit = preset_context(args.preset) if args.preset else None
    # 0 is a mistake to report (prepare checks the range), not "unset"
    max_length = args.max_length if args.max_length is not None else preset_context(args.preset)
    kinds = {args.kind or detect_kind(p) for p in args.inputs}
    options = {kind: _source_options(args, kind) for kind in kinds}
    summary = prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        kind=args.kind,
        max_length=max_length,
        mode=args.mode,
        val_fraction=args.val_fraction,
        seed=args.seed,
        answer_only_loss=args.answer_only_loss,
        articles_as=args.articles_as,
        template=args.template.replace("\\n", "\n") if args.template else QA_TEMPLATE,
        gpt2_dir=args.gpt2_dir,
        model_max_length=model_limit,
        source_options=options,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    print(prepare_summary(summary))
    return 0


def prepare_summary(s: dict) -> str:
    """The lines `dtl prepare` prints at the end."""
    tr, va = s["train"], s["val"]
    documents = s.get("documents", tr["documents"] + va["documents"])  # a cut one is in both
    lines = [
        f"prepared {_count(s['examples'], 'example')} from {_count(documents, 'document')} "
        f"in {s['seconds']:.1f}s -> {s['data_dir']}",
        f"  tokenizer {s['tokenizer']} (vocab {s['vocab_size']:,}, {s['dtype']}), mode {s['mode']}, "
        f"max_length {s['max_length']}" + (", answer-only loss" if s["answer_only_loss"] else ""),
        f"  train: {tr['documents']:,} documents, {tr['tokens']:,} tokens, {tr['rows']:,} rows",
        f"  val:   {va['documents']:,} documents, {va['tokens']:,} tokens, {va['rows']:,} rows",
    ]
    if s.get("split") in ("tokens", "examples"):
        lines.append(_split_line(s, documents))
    if s.get("truncated"):
        lines.append(
            f"  {s['truncated']:,} examples were longer than max_length + 1 and are cut "
            f"(longest {s['longest']:,} tokens); raise --max-length to keep them whole"
        )
    skipped = _skipped(s.get("extract") or {})
    if skipped:
        lines.append(f"  skipped pages: {skipped}")
    if not va["rows"] and s["val_fraction"] > 0:
        lines.append("  warning: the val split has no rows; add data or raise --val-fraction")
    return "\n".join(lines)


def _skipped(counts: dict) -> str:
    """What a Wikipedia dump's counts say was passed over: "100 redirects, 8 disambiguation"."""
    skipped = [(k, v) for k, v in counts.items() if k not in ("pages", "articles") and v]
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped)


def _split_line(s: dict, documents: int) -> str:
    """How a source with too few documents was split within them (see dtl.data.split)."""
    unit = s["split"]  # tokens | examples
    share = s["val"][unit] / max(s["train"][unit] + s["val"][unit], 1)
    reason = s.get("split_reason") or "too few to hold out whole documents"
    return (
        f"  split: the last {100 * share:.3g}% of each document's {unit} went to val "
        f"({_count(documents, 'document')}: {reason})"
    )


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"
