"""Sources or records -> a prepared data dir of token shards (the spec's data flow up to batching).

>>> summary = prepare(["wiki.test.raw"], "data/wt2", tokenizer="gpt2", max_length=256)  # doctest: +SKIP
>>> summary["train"]["tokens"], summary["mode"]                                          # doctest: +SKIP
(270412, 'pack')

Plain documents are packed by default (joined with end-of-text, cut into max_length + 1
windows); Q&A examples are padded by default (one per row). Every example ends with the
end-of-text token, which is always a loss target so a model learns to stop. With
`answer_only_loss`, the question (prompt) tokens are not targets either.
The train/val split is by document, or within documents when there are too few of them
(`dtl.data.split` has the rule); meta.json says which ("split") and why ("split_reason").
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dtl.data.loader import META_FILE
from dtl.data.qa import QA_TEMPLATE, article_to_qa, split_qa
from dtl.data.shards import ShardWriter, commit_dir, sha256_file, staging_dir, token_dtype
from dtl.data.sources import check_inputs, detect_kind, is_hub_name, iter_records_counting
from dtl.data.split import SPLITS, Splitter, count_rows
from dtl.errors import DtlError
from dtl.fileio import disk_full_as_error
from dtl.model.config import preset_context
from dtl.tokenizer import Tokenizer, load_tokenizer

MODES = ("pack", "pad")
ARTICLES_AS = ("text", "qa", "both")  # what an article becomes
BATCH = 512  # examples tokenized per encode_batch call
MAX_LENGTH_LIMIT = 65_536


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
    max_length: int | None = None,
    mode: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    *,
    answer_only_loss: bool = False,
    articles_as: str = "text",
    template: str = QA_TEMPLATE,
    gpt2_dir: str | os.PathLike | None = None,
    model_max_length: int | None = None,
    source_options: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize sources (raw files or records.jsonl) into `out_dir`; returns the summary.

    `source_options` are each source kind's reader options, by kind (see `iter_records`),
    e.g. `{"wikipedia": {"processes": 2}, "squad": {"unanswerable": ""}}`: an input gets
    only its own kind's. `max_length` defaults to the default preset's context (what
    `dtl prepare` and `dtl train` assume: `dtl.model.config.preset_context`).
    """
    started = time.perf_counter()
    if max_length is None:
        max_length = preset_context()
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not inputs:
        raise DtlError("no inputs given; pass one or more source files or records.jsonl")
    _check_args(max_length, mode, val_fraction, model_max_length)
    check_inputs(inputs)
    tok = load_tokenizer(tokenizer, gpt2_dir)
    job = _Job(
        inputs=inputs,
        kind=kind,
        max_length=max_length,
        mode=mode,
        val_fraction=val_fraction,
        seed=seed,
        answer_only_loss=answer_only_loss,
        articles_as=articles_as,
        template=template,
        source_options=source_options or {},
        progress=progress,
    )
    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        with disk_full_as_error(out_dir, "free space or choose another -o"):
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
    source_options: dict[str, dict[str, Any]]
    progress: bool

    @property
    def names(self) -> str:
        """The inputs, for a message."""
        return ", ".join(map(str, self.inputs))

    def records(self, extract_stats: dict[str, Any]) -> Iterator[dict]:
        for path in self.inputs:
            kind = self.kind or detect_kind(path)
            options = self.source_options.get(kind, {})
            yield from iter_records_counting(path, kind, extract_stats, **options)

    def sources(self) -> list[dict[str, Any]]:
        """What meta.json records of each input file (hf: datasets have no file)."""
        files = [Path(p) for p in self.inputs if not is_hub_name(p)]
        return [
            {
                "path": str(p),
                "kind": self.kind or detect_kind(p),
                "bytes": p.stat().st_size,
                "sha256": sha256_file(p),
            }
            for p in files
        ]


def _write(job: _Job, tmp: Path, tok: Tokenizer) -> dict[str, Any]:
    """Tokenize every example of `job` into shards in `tmp`; returns the summary."""
    extract_stats: dict[str, Any] = {}
    examples = records_to_examples(job.records(extract_stats), job.articles_as, job.template)
    first = next(examples, None)
    if first is None:
        raise DtlError(f"no documents or Q&A pairs came out of {job.names}; check --kind")
    mode = job.mode or ("pad" if first.is_qa else "pack")
    with_mask = job.answer_only_loss  # otherwise every real token is a target: no mask file
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(tmp, s, dtype, with_mask, with_offsets=mode == "pad") for s in SPLITS}
    splitter = Splitter(writers, job.seed, job.val_fraction)
    counts = _write_examples(chain([first], examples), tok, splitter, job, mode)
    for writer in writers.values():
        writer.close()
    split, reason = "documents", splitter.resplit_reason(mode, job.max_length)
    if reason:
        split = splitter.resplit(mode, job.max_length, job.names)
    tok.save(tmp)
    return {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "mode": mode,
        "max_length": job.max_length,
        "template": job.template,
        "answer_only_loss": job.answer_only_loss,
        "loss_mask": with_mask,
        "articles_as": job.articles_as,
        "val_fraction": job.val_fraction,
        "seed": job.seed,
        **counts,
        "documents": splitter.n_documents,
        "split": split,  # documents | tokens | examples (see dtl.data.split)
        "split_reason": reason,
        **_split_sizes(splitter, mode, job.max_length),  # "train", "val"
        "extract": {k: v for k, v in extract_stats.items() if not isinstance(v, list)},
        "sources": job.sources(),
    }


def _write_examples(
    examples: Iterable[Example], tok: Tokenizer, splitter: Splitter, job: _Job, mode: str
) -> dict[str, int]:
    """Tokenize `examples` in batches onto the splitter's shards; returns the counts meta.json
    keeps: examples, Q&A examples, examples cut to max_length + 1 (pad), the longest."""
    counts = {"examples": 0, "qa_examples": 0, "truncated": 0, "longest": 0}
    bar = tqdm(
        desc="prepare", unit=" ex", disable=not job.progress, file=sys.stderr, dynamic_ncols=True
    )
    for batch in _batched(examples, BATCH):
        for ex, (ids, flags) in zip(batch, _encode(tok, batch, job.answer_only_loss), strict=True):
            splitter.add(ex.key, ids, flags if job.answer_only_loss else None)
            counts["examples"] += 1
            counts["qa_examples"] += ex.is_qa
            counts["truncated"] += mode == "pad" and len(ids) > job.max_length + 1
            counts["longest"] = max(counts["longest"], len(ids))
        bar.update(len(batch))
    bar.close()
    return counts


def _split_sizes(splitter: Splitter, mode: str, max_length: int) -> dict[str, dict[str, int]]:
    """What each split holds: documents, examples, tokens and the rows `dtl train` cuts."""
    return {
        name: {
            "documents": splitter.documents[name],
            "examples": writer.n_examples,
            "tokens": writer.n_tokens,
            "rows": count_rows(writer, mode, max_length),
        }
        for name, writer in splitter.writers.items()
    }
