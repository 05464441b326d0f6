"""Wikipedia XML dumps -> clean article records, streamed, cleaned on all cores.

>>> for rec in iter_wikipedia("enwiki-pages-articles1.xml.bz2"):   # doctest: +SKIP
...     print(rec["title"], rec["text"][:60])
Anarchism Anarchism is a political philosophy that advocates self-governed

Reading: the standard library's `iterparse` over the (bz2) stream, so memory stays flat and
exports without `<siteinfo>` or `<ns>` still work. Kept: namespace-0 pages that are not
redirects or disambiguation pages. Cleaning: `clean_wikitext` (dtl.data.wikimarkup) on each
page, in a pool of processes.
"""

from __future__ import annotations

import bz2
import multiprocessing
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dtl.data.wikimarkup import clean_wikitext
from dtl.errors import DtlError

# A page that uses one of these templates is a disambiguation page (dropped unless asked).
_DISAMBIG = re.compile(
    r"\{\{\s*(?:disambiguation|disambig|dab|disamb|hndis|geodis|numberdis|letter-numbercombdisambig|"
    r"mathdab|schooldis|shipindex|surname|given name|set index)\s*(?:\||\}\})",
    re.I,
)


def is_disambiguation(title: str, text: str) -> bool:
    """Whether a page lists the meanings of its title rather than being an article."""
    return title.endswith("(disambiguation)") or _DISAMBIG.search(text) is not None


# --- reading the XML stream -----------------------------------------------------------------
DEFAULT_NAMESPACES = (
    "Talk",
    "User",
    "User talk",
    "Wikipedia",
    "Wikipedia talk",
    "File",
    "File talk",
    "MediaWiki",
    "MediaWiki talk",
    "Template",
    "Template talk",
    "Help",
    "Help talk",
    "Category",
    "Category talk",
    "Portal",
    "Portal talk",
    "Draft",
    "Draft talk",
    "Module",
    "Module talk",
    "Media",
    "Special",
    "Book",
    "TimedText",
    "Gadget",
    "Image",
)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _open(path: Path) -> Any:
    with open(path, "rb") as f:
        magic = f.read(3)
    return bz2.open(path, "rb") if magic == b"BZh" else open(path, "rb")


def iter_pages(path: Path) -> Iterator[dict]:
    """Raw pages `{title, ns, redirect, text}` of a MediaWiki XML export (plain or .bz2)."""
    namespaces = set(DEFAULT_NAMESPACES)
    try:
        with _open(path) as stream:
            context = ET.iterparse(stream, events=("start", "end"))
            root = None
            for event, elem in context:
                if root is None:
                    root = elem
                if event != "end":
                    continue
                tag = _local(elem.tag)
                if tag == "namespace" and elem.text:
                    namespaces.add(elem.text)
                elif tag == "page":
                    yield _page(elem, namespaces)
                    root.clear()  # drop finished pages: memory stays flat
            if root is None or _local(root.tag) != "mediawiki":
                raise DtlError(
                    f"{path}: not a MediaWiki XML export (root <{root.tag if root is not None else ''}>)"
                )
    except ET.ParseError as err:
        line, column = err.position
        raise DtlError(
            f"{path}: invalid XML at line {line}, column {column} ({err.msg if hasattr(err, 'msg') else err}); is the download complete?"
        ) from None
    except EOFError:
        raise DtlError(
            f"{path}: the .bz2 stream ends early (truncated download?); download the file again"
        ) from None
    except OSError as err:
        raise DtlError(
            f"{path}: cannot read the dump ({err}); is it a complete .xml or .xml.bz2 file?"
        ) from None


def _page(elem: ET.Element, namespaces: set[str]) -> dict:
    fields: dict[str, Any] = {"title": "", "ns": None, "redirect": False, "text": ""}
    for child in elem.iter():
        tag = _local(child.tag)
        if tag == "title":
            fields["title"] = (child.text or "").strip()
        elif tag == "ns":
            fields["ns"] = int(child.text or 0)
        elif tag == "redirect":
            fields["redirect"] = True
        elif tag == "text":
            fields["text"] = child.text or ""
    if fields["ns"] is None:  # exports without <ns>: judge by the title's prefix
        prefix = fields["title"].split(":", 1)[0] if ":" in fields["title"] else ""
        fields["ns"] = 1 if prefix in namespaces else 0
    if re.match(r"\s*#redirect\b", fields["text"], re.I):
        fields["redirect"] = True
    return fields


# --- the pool -------------------------------------------------------------------------------


def _clean_chunk(chunk: list[tuple[str, str]]) -> list[tuple[str, str | None, list[str], str]]:
    """Worker: (title, text or None on failure, sections, error)."""
    out = []
    for title, text in chunk:
        try:
            clean, sections = clean_wikitext(text)
            out.append((title, clean, sections, ""))
        except Exception as err:  # one bad page never stops the run
            out.append((title, None, [], f"{type(err).__name__}: {err}"))
    return out


def _chunks(
    pages: Iterator[tuple[str, str]], max_bytes: int = 200_000
) -> Iterator[list[tuple[str, str]]]:
    chunk, size = [], 0
    for page in pages:
        chunk.append(page)
        size += len(page[1])
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _cleaned(chunks: Iterator[list[tuple[str, str]]], processes: int) -> Iterator[list]:
    if processes <= 1:
        for chunk in chunks:
            yield _clean_chunk(chunk)
        return
    # A bounded window of chunks in flight (Pool.imap would read the whole dump ahead).
    # fork where there is one: workers start at once and a user's script needs no __main__
    # guard; they run only the pure-Python cleaner, so the parent's threads do not matter.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(processes) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_clean_chunk, (chunk,)))
            if len(pending) >= 4 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# What `iter_wikipedia` counts, in the order meta.json and `dtl extract` list the counts.
COUNTS = ("pages", "articles", "redirects", "other_namespace", "disambiguation", "failed", "empty")


def iter_wikipedia(
    path: str | os.PathLike,
    processes: int | None = None,
    stats: dict | None = None,
    keep_disambiguation: bool = False,
    min_chars: int = 1,
) -> Iterator[dict]:
    """Clean `{title, text, sections}` records of a dump's articles, in dump order.

    `stats` (if given) is filled with pages / articles / redirects / other_namespace /
    disambiguation / failed counts and the failed titles.
    """
    path = Path(path)
    processes = processes or min(os.cpu_count() or 1, 8)
    counts = stats if stats is not None else {}
    for key in COUNTS:
        counts[key] = 0
    counts["failed_titles"] = []
    pages = _article_pages(path, counts, keep_disambiguation)
    for results in _cleaned(_chunks(pages), processes):
        for title, text, sections, error in results:
            if text is None:
                counts["failed"] += 1
                counts["failed_titles"].append(title)
                print(f"dtl extract: skipped page {title!r}: {error}", file=sys.stderr)
            elif len(text) < min_chars:
                counts["empty"] += 1
            else:
                counts["articles"] += 1
                yield {"title": title, "text": text, "sections": sections}


def _article_pages(
    path: Path, counts: dict, keep_disambiguation: bool
) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the dump's articles; the pages passed over are counted by why."""
    for page in iter_pages(path):
        counts["pages"] += 1
        if page["redirect"]:
            counts["redirects"] += 1
        elif page["ns"] != 0:
            counts["other_namespace"] += 1
        elif not keep_disambiguation and is_disambiguation(page["title"], page["text"]):
            counts["disambiguation"] += 1
        else:
            yield page["title"], page["text"]
