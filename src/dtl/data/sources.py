"""Sources -> clean records, streamed one dict at a time.

>>> for rec in iter_records("wiki.test.raw", "wikitext"):        # doctest: +SKIP
...     print(rec["title"], len(rec["text"]))
Robert Boulter 6712

Article records are `{"title", "text"}` (plus `"sections"`: the heading lines inside `text`);
Q&A records are `{"question", "answer", "context"?, "title"?}`; SQuAD records also carry `"id"`,
`"answers"` (every gold answer; `[]` for unanswerable ones) and `"is_impossible"`.
Kinds: wikipedia | wikitext | squad | jsonl | text, or a Hugging Face dataset name
(`hf:wikitext-2`, `hf:wikitext-103`, `hf:squad`, `hf:squad_v2`) when online.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dtl.data.wikipedia import iter_wikipedia
from dtl.errors import DtlError
from dtl.fileio import read_lines

KINDS = ("wikipedia", "wikitext", "squad", "jsonl", "text")
HF_DATASETS = {
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1", "wikitext"),
    "wikitext-103": ("wikitext", "wikitext-103-raw-v1", "wikitext"),
    "squad": ("squad", None, "squad"),
    "squad_v2": ("squad_v2", None, "squad"),
}


def detect_kind(path: str | os.PathLike) -> str:
    """Guess a source's kind from its name (and, for .json, nothing else is needed)."""
    name = Path(path).name.lower()
    if is_hub_name(path):
        return "hf"
    if re.search(r"\.xml(\.bz2)?$", name) or name.endswith(".bz2"):
        return "wikipedia"
    if re.search(r"\.(raw|tokens)$", name):
        return "wikitext"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "squad"
    return "text"


def is_hub_name(path: str | os.PathLike) -> bool:
    """Whether a source is a Hugging Face dataset name (`hf:squad`) rather than a file."""
    return str(path).startswith("hf:")


def check_inputs(paths: Iterable[str | os.PathLike]) -> None:
    """Fail early, before any work, on a missing, folder or empty file; hf:NAME is checked
    when it is read."""
    for path in paths:
        if not is_hub_name(path):
            check_input(path)


def check_input(path: str | os.PathLike) -> Path:
    """The path, or a DtlError when it is missing, a folder, or empty."""
    path = Path(path)
    if not path.exists():
        raise DtlError(f"{path}: no such file")
    if path.is_dir():
        raise DtlError(f"{path} is a directory; pass the file(s) inside it")
    if path.stat().st_size == 0:
        raise DtlError(f"{path}: the file is empty")
    return path


def iter_records(
    path: str | os.PathLike, kind: str | None = None, **options: Any
) -> Iterator[dict]:
    """Clean records of one source. Options by kind:

    wikipedia: `processes` (default: all cores), `stats` (a dict filled with counts);
    wikitext: `detokenize` (default: only for `.tokens` files);
    squad: `unanswerable` (None skips them; a string such as "" keeps them with that answer);
    jsonl: `fields` (our name -> the file's, e.g. {"question": "q", "answer": "a"});
    text: `split` ("file": one document per file, or "blank": split on blank lines).
    """
    kind = kind or detect_kind(path)
    if kind == "hf" or is_hub_name(path):
        yield from iter_hf(str(path).removeprefix("hf:"), **options)
        return
    if kind not in KINDS:
        raise DtlError(f"unknown --kind {kind!r}; choose one of {', '.join(KINDS)}")
    yield from _READERS[kind](check_input(path), **options)


def iter_records_counting(
    path: str | os.PathLike, kind: str | None, stats: dict, **options: Any
) -> Iterator[dict]:
    """`iter_records`, with a Wikipedia dump's page counts (pages, redirects, disambiguation,
    failed, ...) filled into `stats` unless `options` bring their own; other kinds leave it be.

    >>> from dtl.corpus import corpus_files
    >>> stats = {}
    >>> records = list(iter_records_counting(corpus_files()[0], None, stats))
    >>> len(records), stats["disambiguation"]
    (98, 8)
    """
    kind = kind or detect_kind(path)
    if kind == "wikipedia":
        options.setdefault("stats", stats)
    return iter_records(path, kind, **options)


# --- WikiText -------------------------------------------------------------------------------

_WT_HEADING = re.compile(r"^\s*(=(?: =)*) (.+?) \1\s*$")
_WT_DETOK = [
    (re.compile(r" @([-,.])@ "), r"\1"),
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b"), r"\1"),
]


def detokenize_wikitext(line: str) -> str:
    """Undo WikiText's tokenization: ` @-@ ` -> `-`, ` @,@ ` -> `,`, space before punctuation."""
    for pattern, replacement in _WT_DETOK:
        line = pattern.sub(replacement, line)
    return line


def iter_wikitext(path: Path, detokenize: bool | None = None) -> Iterator[dict]:
    """WikiText-2/103 articles, split at ` = Title = ` lines (LF or CRLF, blank lines or none)."""
    if detokenize is None:
        detokenize = path.name.endswith(".tokens")
    yield from wikitext_articles(read_lines(path), detokenize)


def wikitext_articles(lines: Iterable[str], detokenize: bool = False) -> Iterator[dict]:
    """Articles from WikiText lines; ` = = Heading = = ` lines become plain heading lines."""
    title, body, sections = None, [], []
    for raw in lines:
        line = raw.strip()
        if detokenize:
            line = detokenize_wikitext(line)
        match = _WT_HEADING.match(line)
        if match and match.group(1) == "=":
            if title and body:
                yield {"title": title, "text": "\n".join(body), "sections": sections}
            title, body, sections = match.group(2).strip(), [], []
        elif match:
            body.append(match.group(2).strip())
            sections.append(body[-1])
        elif line:
            body.append(line)
    if title and body:
        yield {"title": title, "text": "\n".join(body), "sections": sections}


# --- SQuAD ----------------------------------------------------------------------------------


def _need(obj: Any, key: str, where: str, path: Path, kind: type) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DtlError(f"{path}: {where} has no {key!r} field; is this SQuAD v1.1/v2.0 JSON?")
    value = obj[key]
    if not isinstance(value, kind):
        raise DtlError(
            f"{path}: {where}.{key} should be a {kind.__name__}, got {type(value).__name__}"
        )
    return value


def iter_squad(path: Path, unanswerable: str | None = None) -> Iterator[dict]:
    """SQuAD v1.1 / v2.0 questions; the first gold answer is the training answer."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DtlError(f"{path}: not UTF-8 (bad byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise DtlError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); is it a "
            f"SQuAD .json file? (records JSONL take --kind jsonl)"
        ) from None
    articles = _need(data, "data", "the top level", path, list)
    for a, article in enumerate(articles):
        where = f"data[{a}]"
        title = str(article.get("title", "")) if isinstance(article, dict) else ""
        for p, para in enumerate(_need(article, "paragraphs", where, path, list)):
            pwhere = f"{where}.paragraphs[{p}]"
            context = _need(para, "context", pwhere, path, str)
            for q, qa in enumerate(_need(para, "qas", pwhere, path, list)):
                qwhere = f"{pwhere}.qas[{q}]"
                question = _need(qa, "question", qwhere, path, str).strip()
                answers = [
                    _need(x, "text", f"{qwhere}.answers[]", path, str)
                    for x in _need(qa, "answers", qwhere, path, list)
                ]
                impossible = bool(qa.get("is_impossible", False)) or not answers
                if impossible and unanswerable is None:
                    continue
                yield {
                    "question": question,
                    "answer": unanswerable if impossible else answers[0].strip(),
                    "context": context,
                    "title": title,
                    "id": str(qa.get("id", f"{a}-{p}-{q}")),
                    "answers": [] if impossible else answers,
                    "is_impossible": impossible,
                }


# --- JSONL and plain text -------------------------------------------------------------------


def iter_jsonl(path: Path, fields: dict[str, str] | None = None) -> Iterator[dict]:
    """Records already in our shape, one JSON object a line; `fields` renames the file's keys."""
    rename = {theirs: ours for ours, theirs in (fields or {}).items()}
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DtlError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DtlError(f"{path}: line {number} is not a JSON object")
        rec = {rename.get(k, k): v for k, v in obj.items()}
        if isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str):
            yield rec
        elif isinstance(rec.get("text"), str):
            rec.setdefault("title", "")
            yield rec
        else:
            have = ", ".join(sorted(obj)) or "none"
            raise DtlError(
                f"{path}: line {number} has neither text nor question + answer (fields: {have}); "
                f"map yours with --field text=YOURS or --field question=Q --field answer=A"
            )


def iter_text(path: Path, split: str = "file") -> Iterator[dict]:
    """A plain UTF-8 file as one document, or one per blank-line-separated block."""
    if split not in ("file", "blank"):
        raise DtlError(f"unknown text split {split!r}; choose file or blank")
    block: list[str] = []
    count = 0
    for line in read_lines(path):
        if split == "blank" and not line.strip():
            if block:
                count += 1
                yield {"title": f"{path.stem} #{count}", "text": "\n".join(block).strip()}
            block = []
            continue
        block.append(line)
    text = "\n".join(block).strip()
    if text:
        yield {"title": path.stem if split == "file" else f"{path.stem} #{count + 1}", "text": text}


# The reader of each local kind (KINDS); hf:NAME goes to `iter_hf`.
_READERS = {
    "wikipedia": iter_wikipedia,
    "wikitext": iter_wikitext,
    "squad": iter_squad,
    "jsonl": iter_jsonl,
    "text": iter_text,
}


# --- Hugging Face datasets --------------------------------------------------------------------


def iter_hf(name: str, split: str = "train", **options: Any) -> Iterator[dict]:
    """A dataset from the Hugging Face hub by name (needs `pip install dtl[datasets]` and a network)."""
    if name not in HF_DATASETS:
        raise DtlError(
            f"unknown dataset {name!r}; known: {', '.join('hf:' + n for n in HF_DATASETS)}"
        )
    local = {
        "wikitext": "wiki.train.raw with --kind wikitext",
        "squad": "train-v1.1.json / train-v2.0.json with --kind squad",
    }[HF_DATASETS[name][2]]
    try:
        import datasets
    except ImportError:
        raise DtlError(
            f"hf:{name} needs the datasets library (pip install 'dtl[datasets]'); or download the "
            f"files yourself and pass {local}"
        ) from None
    repo, config, kind = HF_DATASETS[name]
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # offline: ConnectionError, OSError, or datasets' own errors
        raise DtlError(
            f"could not load hf:{name} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err)[:200]}); offline, pass local files instead: {local}"
        ) from None
    if kind == "wikitext":
        yield from wikitext_articles(row["text"] for row in ds)
    else:
        yield from _squad_rows(ds, options.get("unanswerable"))


def _squad_rows(ds: Iterable[dict], unanswerable: str | None) -> Iterator[dict]:
    for row in ds:
        answers = list(row["answers"]["text"])
        if not answers and unanswerable is None:
            continue
        yield {
            "question": row["question"].strip(),
            "answer": answers[0].strip() if answers else unanswerable,
            "context": row["context"],
            "title": row.get("title", ""),
            "id": row["id"],
            "answers": answers,
            "is_impossible": not answers,
        }
