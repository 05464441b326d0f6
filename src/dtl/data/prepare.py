"""Sources or records -> a prepared data dir of token shards (the spec's data flow up to batching).

>>> summary = prepare(["wiki.test.raw"], "data/wt2", tokenizer="gpt2", max_length=256)  # doctest: +SKIP
>>> summary["train"]["tokens"], summary["mode"]                                          # doctest: +SKIP
(270412, 'pack')

Plain documents are packed by default (joined with end-of-text, cut into max_length + 1
windows); Q&A examples are padded by default (one per row). Every example ends with the
end-of-text token, which is always a loss target so a model learns to stop. With
`answer_only_loss`, the question (prompt) tokens are not targets either.
The split is by document (a SQuAD paragraph, an article), seeded, decided from a hash of the
document's key, so the same document always lands in the same split (meta "split": "documents").
When val_fraction > 0 and the source has too few documents for that, prepare splits within
documents instead: the last share of each document's tokens (pack; "split": "tokens") or of
its examples (pad; "split": "examples") goes to val, the rest to train, both in document
order, no token in both. The share is val_fraction of the whole, at least one row (L + 1
tokens, or one example) and at most all but one row; it is spread over the documents in
proportion to their sizes. "Too few documents" means, once every document has been written:
  - under FEW_DOCUMENTS (20) documents, and val's share (of tokens in pack mode, of examples
    in pad mode) outside [val_fraction / 2, 2 * val_fraction]; or
  - any number of documents, and train or val has no row.
Corpora with dozens of documents thus keep whole documents unless a split came out empty;
past MAX_TRACKED_DOCUMENTS documents (or MAX_TRACKED_EXAMPLES examples) the document split
always stands. A source too small for a train row and a val row is an error (with
val_fraction > 0): `dtl train` could not use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dtl.data.loader import META_FILE, read_array
from dtl.data.qa import QA_TEMPLATE, article_to_qa, split_qa
from dtl.data.shards import ShardWriter, commit_dir, sha256_file, staging_dir, token_dtype
from dtl.data.sources import check_input, detect_kind, iter_records
from dtl.errors import DtlError
from dtl.tokenizer import Tokenizer, load_tokenizer

MODES = ("pack", "pad")
ARTICLES_AS = ("text", "qa", "both")  # what an article becomes
BATCH = 512  # examples tokenized per encode_batch call
MAX_LENGTH_LIMIT = 65_536
SPLITS = ("train", "val")
FEW_DOCUMENTS = 20  # under this many, a whole-document split must also come near val_fraction
# Past this many documents or examples, never re-split: the document split of a corpus that
# large is near the fraction (and remembering every document's span would cost memory).
MAX_TRACKED_DOCUMENTS = 100_000
MAX_TRACKED_EXAMPLES = 2_000_000
COPY_CHUNK = 1 << 22  # tokens per read when re-splitting within documents


@dataclass
class Example:
    """One training example before tokenization: prompt (not a target with answer_only_loss) + rest."""

    prompt: str
    completion: str
    key: str  # the document it belongs to (the split unit)
    is_qa: bool


def records_to_examples(
    records: Iterable[dict], articles_as: str = "text", template: str = QA_TEMPLATE
) -> Iterator[Example]:
    """Q&A records -> template text; articles -> plain text, Q&A pairs by `article_to_qa`, or
    ("both") the text followed by its pairs, all keyed to the article so they share a split."""
    if articles_as not in ARTICLES_AS:
        raise DtlError(f"unknown articles_as {articles_as!r}; choose {', '.join(ARTICLES_AS)}")
    for i, rec in enumerate(records):
        if "question" in rec:
            prompt, completion = split_qa(str(rec["question"]), str(rec["answer"]), template)
            key = rec.get("context") or rec.get("title") or f"#{i}"
            yield Example(prompt, completion, str(key), True)
            continue
        key = f"{rec.get('title', '')}#{i}"
        if articles_as in ("text", "both") and str(rec.get("text", "")).strip():
            yield Example("", str(rec["text"]), key, False)
        if articles_as in ("qa", "both"):
            for qa in article_to_qa(str(rec.get("title", "")), _with_heading_marks(rec)):
                prompt, completion = split_qa(qa["question"], qa["answer"], template)
                yield Example(prompt, completion, key, True)


def _with_heading_marks(rec: dict) -> str:
    """Article text with its heading lines as `== H ==`, the form `article_to_qa` reads."""
    headings = set(rec.get("sections") or [])
    if not headings:
        return str(rec["text"])
    lines = [f"== {line} ==" if line in headings else line for line in str(rec["text"]).split("\n")]
    return "\n".join(lines)


def is_val(key: str, seed: int, val_fraction: float) -> bool:
    """Whether a document goes to val: a seeded hash of its key, so it is stable and streamable."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def _check_args(
    max_length: int, mode: str | None, val_fraction: float, model_max_length: int | None
) -> None:
    if not isinstance(max_length, int) or not 1 <= max_length <= MAX_LENGTH_LIMIT:
        raise DtlError(f"--max-length {max_length} must be an integer in 1..{MAX_LENGTH_LIMIT}")
    if model_max_length is not None and max_length > model_max_length:
        raise DtlError(
            f"--max-length {max_length} is over the model's limit of {model_max_length} tokens "
            f"(max_seq_length); use --max-length {model_max_length} or less"
        )
    if mode is not None and mode not in MODES:
        raise DtlError(f"unknown mode {mode!r}; choose pack or pad")
    if not 0.0 <= val_fraction < 1.0:
        raise DtlError(f"--val-fraction {val_fraction} must be in [0, 1)")


def _batched(items: Iterable[Example], n: int) -> Iterator[list[Example]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


class _Splitter:
    """Routes tokenized examples to train/val by document and remembers where each document
    went (while there are at most MAX_TRACKED_DOCUMENTS), so `resplit` can split within them."""

    def __init__(self, writers: dict[str, ShardWriter], seed: int, val_fraction: float) -> None:
        self.writers, self.seed, self.val_fraction = writers, seed, val_fraction
        self.documents = {"train": 0, "val": 0}
        self.n_documents = 0
        self.last_key: str | None = None
        self.last_split = ""
        # A tracked document: [split, first example, end example], counted in its split;
        # ends[split][j] is the token position where example j of the split ends.
        self.spans: list[list] | None = []
        self.ends = {split: array("Q") for split in SPLITS}

    def add(self, key: str, ids: np.ndarray, mask: np.ndarray | None) -> None:
        if key != self.last_key:
            split = "val" if is_val(key, self.seed, self.val_fraction) else "train"
            self.documents[split] += 1
            self.n_documents += 1
            self.last_key, self.last_split = key, split
            if self.spans is not None and len(self.spans) == MAX_TRACKED_DOCUMENTS:
                self.spans, self.ends = None, {}  # a corpus this large keeps whole documents
            if self.spans is not None:
                n = self.writers[split].n_examples
                self.spans.append([split, n, n])
        writer = self.writers[self.last_split]
        writer.append(ids, mask)
        if self.spans is not None:
            self.spans[-1][2] += 1
            self.ends[self.last_split].append(writer.n_tokens)
            if len(self.ends["train"]) + len(self.ends["val"]) > MAX_TRACKED_EXAMPLES:
                self.spans, self.ends = None, {}

    def resplit_reason(self, mode: str, max_length: int) -> str | None:
        """Why the document split is not kept (None: it is); the rule is the module docstring's."""
        f = self.val_fraction
        if f <= 0 or self.spans is None:
            return None
        size = {s: _size(w, mode) for s, w in self.writers.items()}
        total = size["train"] + size["val"]
        share = size["val"] / total if total else 0.0
        if self.n_documents < FEW_DOCUMENTS and not f / 2 <= share <= 2 * f:
            return "too few to hold out whole documents"
        empty = [s for s, w in self.writers.items() if not _rows(w, mode, max_length)]
        if empty:
            return f"held out whole, they left {' and '.join(empty)} without a row"
        return None

    def resplit(self, mode: str, max_length: int, inputs: str) -> str:
        """Split within documents instead: the last share of each document's tokens (pack) or
        examples (pad) go to val, the rest to train, both in document order. Copies the spans
        from the (closed) shards into new ones, which replace them; returns the split kind."""
        by_tokens = mode == "pack"
        ends = {s: np.frombuffer(self.ends[s], dtype=np.uint64).astype(np.int64) for s in SPLITS}
        starts = {s: np.concatenate([[0], e[:-1]]) for s, e in ends.items()}
        if by_tokens:
            sizes = [int(ends[s][b - 1] - starts[s][a]) for s, a, b in self.spans]
        else:
            sizes = [b - a for _, a, b in self.spans]
        total, least = sum(sizes), (max_length + 1 if by_tokens else 1)
        if total < 2 * least:
            raise DtlError(_too_small(inputs, total, mode, max_length))
        target = min(max(math.ceil(self.val_fraction * total), least), total - least)
        shares = _allocate(target, sizes)
        old = {s: _read_shard(w) for s, w in self.writers.items()}
        new = {s: _like(w, f"{s}-resplit") for s, w in self.writers.items()}
        documents = {"train": 0, "val": 0}
        for (split, a, b), share in zip(self.spans, shares, strict=True):
            doc_ends = ends[split][a:b]
            start, stop = int(starts[split][a]), int(doc_ends[-1])
            kept = b - a - share  # examples wholly in train (pad)
            cut = stop - share if by_tokens else (int(doc_ends[kept - 1]) if kept else start)
            for name, lo, hi in (("train", start, cut), ("val", cut, stop)):
                if hi > lo:
                    _copy(old[split], lo, hi, doc_ends, new[name])
                    documents[name] += 1
        del old  # the memory maps, before their files are replaced
        for name, writer in new.items():
            writer.close()
            for src, dst in zip(writer.paths(), self.writers[name].paths(), strict=True):
                os.replace(src, dst)
            writer.split = name
        self.writers, self.documents = new, documents
        return "tokens" if by_tokens else "examples"


def _size(writer: ShardWriter, mode: str) -> int:
    """What the split is measured in: tokens (pack) or examples (pad)."""
    return writer.n_tokens if mode == "pack" else writer.n_examples


def _rows(writer: ShardWriter, mode: str, max_length: int) -> int:
    return writer.n_examples if mode == "pad" else max(writer.n_tokens - 1, 0) // max_length


def _too_small(inputs: str, total: int, mode: str, max_length: int) -> str:
    if mode == "pad":
        return (
            f"{inputs}: {total} example{'s' * (total != 1)}, too few for a train row and a val "
            f"row (one example each); add more examples"
        )
    return (
        f"{inputs}: {total:,} tokens, too few for a train row and a val row of max_length + 1 "
        f"= {max_length + 1:,} tokens each; add text or re-run `dtl prepare --max-length N` "
        f"with a smaller N (dtl train --data FILE: --seq-len N)"
    )


def _allocate(target: int, sizes: list[int]) -> list[int]:
    """`target` split over `sizes` in proportion, by cumulative rounding: the parts sum to
    `target` exactly and none is over its size (target <= sum(sizes))."""
    total, cumulative, given, parts = sum(sizes), 0, 0, []
    for size in sizes:
        cumulative += size
        upto = (2 * target * cumulative + total) // (2 * total)  # round(target * cum / total)
        parts.append(upto - given)
        given = upto
    return parts


@dataclass
class _Shard:
    """A written split, read back: tokens and (with masks) loss flags."""

    tokens: np.ndarray
    mask: np.ndarray | None


def _read_shard(writer: ShardWriter) -> _Shard:
    paths = writer.paths()
    mask = read_array(paths[1], np.uint8) if writer.with_mask else None
    return _Shard(read_array(paths[0], writer.dtype), mask)


def _like(writer: ShardWriter, split: str) -> ShardWriter:
    """A new writer of the same kind as `writer`, under another name."""
    return ShardWriter(writer.directory, split, writer.dtype, writer.with_mask,
                       writer.with_offsets)  # fmt: skip


def _copy(src: _Shard, lo: int, hi: int, ends: np.ndarray, dst: ShardWriter) -> None:
    """Tokens [lo, hi) of `src` onto `dst`, streamed in chunks. `ends` (ascending) are where
    the source's examples end; an example cut at `hi` counts as one ending there."""
    base = dst.n_tokens
    for a in range(lo, hi, COPY_CHUNK):
        b = min(a + COPY_CHUNK, hi)
        dst.extend(src.tokens[a:b], None if src.mask is None else src.mask[a:b])
    inside = ends[(ends > lo) & (ends <= hi)].tolist()
    if not inside or inside[-1] != hi:
        inside.append(hi)
    dst.end_examples([base + e - lo for e in inside])


def _encode(
    tok: Tokenizer, batch: list[Example], answer_only_loss: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss flags) per example: prompt ids + completion ids + end-of-text."""
    completions = tok.encode_batch([ex.completion for ex in batch])
    with_prompt = [i for i, ex in enumerate(batch) if ex.prompt]
    prompts = dict(
        zip(with_prompt, tok.encode_batch([batch[i].prompt for i in with_prompt]), strict=True)
    )
    for i, rest in enumerate(completions):
        head = prompts.get(i, [])
        ids = np.fromiter(
            [*head, *rest, tok.eos_id], dtype=np.int64, count=len(head) + len(rest) + 1
        )
        flags = np.ones(len(ids), dtype=np.uint8)
        if answer_only_loss:
            flags[: len(head)] = 0
        yield ids, flags


def prepare(
    inputs: list[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer = "gpt2",
    kind: str | None = None,
    max_length: int = 512,
    mode: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    *,
    answer_only_loss: bool = False,
    articles_as: str = "text",
    template: str = QA_TEMPLATE,
    gpt2_dir: str | os.PathLike | None = None,
    model_max_length: int | None = None,
    source_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize sources (raw files or records.jsonl) into `out_dir`; returns the summary."""
    started = time.perf_counter()
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not inputs:
        raise DtlError("no inputs given; pass one or more source files or records.jsonl")
    _check_args(max_length, mode, val_fraction, model_max_length)
    for path in inputs:
        if not str(path).startswith("hf:"):
            check_input(path)
    tok = load_tokenizer(tokenizer, gpt2_dir)
    job = _Job(inputs, kind, max_length, mode, val_fraction, seed, answer_only_loss, articles_as,
               template, source_options or {}, progress)  # fmt: skip
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        summary = _write(job, tmp, tok)
        # Load with load_tokenizer(data_dir): its files were saved beside the shards.
        summary["tokenizer"] = "gpt2" if tok.name == "gpt2" else str(tokenizer)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        (tmp / META_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        commit_dir(tmp, out_dir)
    except BaseException:  # no half-written data dir is ever left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["data_dir"] = str(out_dir)
    return summary


@dataclass
class _Job:
    """The settings of one `prepare` call."""

    inputs: list
    kind: str | None
    max_length: int
    mode: str | None
    val_fraction: float
    seed: int
    answer_only_loss: bool
    articles_as: str
    template: str
    source_options: dict[str, Any]
    progress: bool

    def records(self, extract_stats: dict[str, Any]) -> Iterator[dict]:
        for path in self.inputs:
            kind = self.kind or detect_kind(path)
            options = dict(self.source_options)
            if kind == "wikipedia":
                options.setdefault("stats", extract_stats)
            yield from iter_records(path, kind, **options)

    def sources(self) -> list[dict[str, Any]]:
        """What meta.json records of each input file (hf: datasets have no file)."""
        files = [Path(p) for p in self.inputs if not str(p).startswith("hf:")]
        return [
            {
                "path": str(p),
                "kind": self.kind or detect_kind(p),
                "bytes": p.stat().st_size,
                "sha256": sha256_file(p),
            }  # fmt: skip
            for p in files
        ]


def _write(job: _Job, tmp: Path, tok: Tokenizer) -> dict[str, Any]:
    """Tokenize every example of `job` into shards in `tmp`; returns the summary."""
    extract_stats: dict[str, Any] = {}
    examples = records_to_examples(job.records(extract_stats), job.articles_as, job.template)
    first = next(examples, None)
    if first is None:
        inputs = ", ".join(map(str, job.inputs))
        raise DtlError(f"no documents or Q&A pairs came out of {inputs}; check --kind")
    mode = job.mode or ("pad" if first.is_qa else "pack")
    max_length = job.max_length
    with_mask = job.answer_only_loss  # otherwise every real token is a target: no mask file
    dtype = token_dtype(tok.vocab_size)
    writers = {
        s: ShardWriter(tmp, s, dtype, with_mask, with_offsets=mode == "pad")
        for s in ("train", "val")
    }
    splitter = _Splitter(writers, job.seed, job.val_fraction)
    counts = {"examples": 0, "qa_examples": 0, "truncated": 0, "longest": 0}
    bar = tqdm(
        desc="prepare", unit=" ex", disable=not job.progress, file=sys.stderr, dynamic_ncols=True
    )
    for batch in _batched(chain([first], examples), BATCH):
        for ex, (ids, flags) in zip(batch, _encode(tok, batch, job.answer_only_loss), strict=True):
            splitter.add(ex.key, ids, flags if with_mask else None)
            counts["examples"] += 1
            counts["qa_examples"] += ex.is_qa
            counts["truncated"] += mode == "pad" and len(ids) > max_length + 1
            counts["longest"] = max(counts["longest"], len(ids))
        bar.update(len(batch))
    bar.close()
    for writer in writers.values():
        writer.close()
    split, reason = "documents", splitter.resplit_reason(mode, max_length)
    if reason:
        inputs = ", ".join(map(str, job.inputs))
        split = splitter.resplit(mode, max_length, inputs)
    writers = splitter.writers
    tok.save(tmp)
    sources = job.sources()
    splits = {}
    for name, writer in writers.items():
        rows = _rows(writer, mode, max_length)
        splits[name] = {
            "documents": splitter.documents[name],
            "examples": writer.n_examples,
            "tokens": writer.n_tokens,
            "rows": rows,
        }
    return {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "mode": mode,
        "max_length": max_length,
        "template": job.template,
        "answer_only_loss": job.answer_only_loss,
        "loss_mask": with_mask,
        "articles_as": job.articles_as,
        "val_fraction": job.val_fraction,
        "seed": job.seed,
        **counts,
        "documents": splitter.n_documents,
        "split": split,  # documents | tokens | examples (see the module docstring)
        "split_reason": reason,
        "train": splits["train"],
        "val": splits["val"],
        "extract": {k: v for k, v in extract_stats.items() if not isinstance(v, list)},
        "sources": sources,
    }
