"""The train/val split of `dtl prepare`: by document, or within documents when there are too few.

>>> is_val("Albedo#0", seed=0, val_fraction=0.05), is_val("Albedo#0", seed=0, val_fraction=0.5)
(False, True)

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
import math
import os
from array import array
from dataclasses import dataclass

import numpy as np

from dtl.data.loader import read_array
from dtl.data.shards import ShardWriter
from dtl.errors import DtlError

SPLITS = ("train", "val")
FEW_DOCUMENTS = 20  # under this many, a whole-document split must also come near val_fraction
# Past this many documents or examples, never re-split: the document split of a corpus that
# large is near the fraction (and remembering every document's span would cost memory).
MAX_TRACKED_DOCUMENTS = 100_000
MAX_TRACKED_EXAMPLES = 2_000_000
COPY_CHUNK = 1 << 22  # tokens per read when re-splitting within documents


def is_val(key: str, seed: int, val_fraction: float) -> bool:
    """Whether a document goes to val: a seeded hash of its key, so it is stable and streamable."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


class Splitter:
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
        """One tokenized example of document `key` (a document's examples come in a row)."""
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
        empty = [s for s, w in self.writers.items() if not count_rows(w, mode, max_length)]
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


def count_rows(writer: ShardWriter, mode: str, max_length: int) -> int:
    """Rows `dtl train` cuts from a split: one per example (pad), or max_length + 1 windows
    that overlap by one token (pack)."""
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
    return ShardWriter(writer.directory, split, writer.dtype, writer.with_mask, writer.with_offsets)


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
