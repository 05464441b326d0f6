"""Wikipedia XML dumps -> clean article records, streamed, cleaned on all cores.

>>> for rec in iter_wikipedia("enwiki-pages-articles1.xml.bz2"):   # doctest: +SKIP
...     print(rec["title"], rec["text"][:60])
Anarchism Anarchism is a political philosophy that advocates self-governed

Reading: the dump's units (`dtl.data.dumps`: each stream of a multistream dump with its index,
else each file) through the standard library's pull parser, block by block, so memory stays
flat and exports without `<siteinfo>` or `<ns>` still work. Kept: namespace-0 pages that are
not redirects or disambiguation pages. Cleaning: `clean_wikitext` (dtl.data.wikimarkup).

Two ways to spread the work, the same output either way (dump order, whatever the number of
processes):
- units: each worker reads, decompresses, parses and cleans whole units (a multistream
  dump's streams, or a folder of parts when there are at least as many parts as processes),
  taking the next task as it comes free; a task is a run of consecutive streams sized by
  compressed bytes (`task_ranges`: ~1 MB, smaller toward the end, the last ones handed out
  largest first), so nothing stands in front of the workers and they finish together;
- reader: for one big file, this process reads and parses it and the workers clean chunks of
  its pages.
Each batch carries its position (unit, pages of it read), so a run can start again there.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtl.data.dumps import Unit, dump_units, read_unit
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


def iter_pages(path: str | os.PathLike) -> Iterator[dict]:
    """Raw pages `{title, ns, redirect, text, offset}` of a MediaWiki XML export (plain or
    .bz2, one stream or many), read from its start as one document."""
    size = Path(path).stat().st_size
    yield from unit_pages(Unit(str(path), 0, size, size, True), set(DEFAULT_NAMESPACES))


def unit_pages(unit: Unit, namespaces: set[str]) -> Iterator[dict]:
    """Raw pages of one unit; `offset`: the unit's compressed bytes read by then. The
    `<namespace>` names of a `<siteinfo>` it holds are added to `namespaces`."""
    where = f"{unit.path}" if unit.whole else f"{unit.path} (the stream at byte {unit.start})"
    parser = ET.XMLPullParser(events=("start", "end"))
    state: dict[str, Any] = {"root": None, "offset": 0}

    def pages() -> Iterator[dict]:
        for event, elem in parser.read_events():
            if state["root"] is None:
                state["root"] = elem
            if event != "end":
                continue
            tag = _local(elem.tag)
            if tag == "namespace" and elem.text:
                namespaces.add(elem.text)
            elif tag == "page":
                page = _page(elem, namespaces)
                page["offset"] = state["offset"]
                yield page
                state["root"].clear()  # drop finished pages: memory stays flat

    try:
        for block, state["offset"] in read_unit(unit):
            parser.feed(block)
            yield from pages()
        parser.close()
        yield from pages()
        root = state["root"]
        if root is None or _local(root.tag) != "mediawiki":
            raise DtlError(
                f"{where}: not a MediaWiki XML export (root <{root.tag if root is not None else ''}>)"
            )
    except ET.ParseError as err:
        line, column = err.position
        raise DtlError(
            f"{where}: invalid XML at line {line}, column {column} ({err.msg if hasattr(err, 'msg') else err}); is the download complete?"
        ) from None
    except EOFError:
        if unit.whole or unit.end == unit.size:
            raise DtlError(
                f"{unit.path}: the .bz2 stream ends early (truncated download?); download the file again"
            ) from None
        raise DtlError(
            f"{unit.path}: the stream at byte {unit.start} runs past byte {unit.end}, where the "
            "index says the next one starts; use the index published with this dump"
        ) from None
    except OSError as err:
        raise DtlError(
            f"{where}: cannot read the dump ({err}); is it a complete .xml or .xml.bz2 file?"
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


# --- which pages, and their cleaning ----------------------------------------------------------

# What `iter_wikipedia` counts, in the order meta.json and `dtl extract` list the counts.
COUNTS = ("pages", "articles", "redirects", "other_namespace", "disambiguation", "failed", "empty")
CHUNK_BYTES = 200_000  # wikitext per chunk the reader hands to a cleaning worker
# A worker task's compressed bytes, at most (a stream bigger than that is a task alone): ~0.4 s
# of work on one core, against a task's ~1 ms of fixed cost (hand-out, result through a pipe).
TASK_BYTES = 1_000_000
TASKS_PER_WORKER = 8  # a task is at most 1/(8 * processes) of what is left: finishing together


@dataclass(frozen=True)
class Settings:
    """What decides a run's output (its records and counts), the same in every worker."""

    keep_disambiguation: bool = False
    min_chars: int = 1
    as_json: bool = False  # records as JSON lines (bytes), or as dicts
    namespaces: frozenset = frozenset(DEFAULT_NAMESPACES)
    spool: str | None = None  # a folder where a worker writes a whole file's JSON lines


@dataclass
class Batch:
    """Records of consecutive pages, in dump order, and where the next batch starts.

    `position` (unit, pages of it read): a run started there continues right after this batch;
    `done_bytes`: the dump's compressed bytes read by then (for progress and ETAs).
    `payload`: JSON lines (bytes), dicts, or the path of a spool file of JSON lines.
    """

    position: tuple[int, int]
    done_bytes: int
    payload: Any
    counts: dict[str, int]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (title, error)


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(COUNTS, 0)


def _keep(page: dict, counts: dict, keep_disambiguation: bool) -> bool:
    """Whether a page is an article to clean; the others are counted by why."""
    counts["pages"] += 1
    if page["redirect"]:
        counts["redirects"] += 1
    elif page["ns"] != 0:
        counts["other_namespace"] += 1
    elif not keep_disambiguation and is_disambiguation(page["title"], page["text"]):
        counts["disambiguation"] += 1
    else:
        return True
    return False


def _clean_pages(pages: list[tuple[str, str]], settings: Settings) -> tuple[Any, dict, list]:
    """(records as JSON lines or dicts, counts of articles / failed / empty, failures)."""
    counts = {"articles": 0, "failed": 0, "empty": 0}
    records, failed = [], []
    for title, text in pages:
        try:
            clean, sections = clean_wikitext(text)
        except Exception as err:  # one bad page never stops the run
            counts["failed"] += 1
            failed.append((title, f"{type(err).__name__}: {err}"))
            continue
        if len(clean) < settings.min_chars:
            counts["empty"] += 1
            continue
        counts["articles"] += 1
        records.append({"title": title, "text": clean, "sections": sections})
    if settings.as_json:  # JSON made here, in the worker: the parent only writes bytes
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return lines.encode("utf-8"), counts, failed
    return records, counts, failed


def _add(total: dict, more: dict) -> dict:
    for key, value in more.items():
        total[key] += value
    return total


def _unit_chunks(
    unit: Unit, skip: int, settings: Settings
) -> Iterator[tuple[int, int, list[tuple[str, str]], dict, bool]]:
    """(pages of the unit read, offset, the articles among them, the counts of the pages read
    since the last chunk, whether the unit is done) about CHUNK_BYTES of wikitext at a time,
    after the first `skip` pages (a resumed run's)."""
    namespaces = set(settings.namespaces)
    chunk: list[tuple[str, str]] = []
    counts = _zero_counts()
    size, read = 0, 0
    for read, page in enumerate(unit_pages(unit, namespaces), 1):
        if read <= skip:
            continue
        if _keep(page, counts, settings.keep_disambiguation):
            chunk.append((page["title"], page["text"]))
            size += len(page["text"])
        if size >= CHUNK_BYTES:
            yield read, page["offset"], chunk, counts, False
            chunk, size, counts = [], 0, _zero_counts()
    yield max(read, skip), unit.end - unit.start, chunk, counts, True


def _unit_job(task: tuple[int, tuple[Unit, ...], int, Settings]) -> Batch:
    """Worker: read, parse and clean consecutive units, the first numbered `number` (its
    first `skip` pages were done before). `done_bytes`: the task's compressed bytes."""
    number, units, skip, settings = task
    counts = _zero_counts()
    failed: list = []
    done = sum(u.end - u.start for u in units)
    if settings.spool and units[0].whole and settings.as_json:
        # A whole file can be GBs of text: its lines go to a spool file, not through a pipe.
        (unit,) = units  # a whole file is a task alone (task_ranges)
        path = Path(settings.spool) / f"unit-{number}.jsonl"
        with open(path, "wb") as out:
            for _, _, chunk, read_counts, _ in _unit_chunks(unit, skip, settings):
                lines, more, bad = _clean_pages(chunk, settings)
                out.write(lines)
                _add(_add(counts, read_counts), more)
                failed += bad
        return Batch((number + 1, 0), done, str(path), counts, failed)
    # A stream's pages are all read before any is cleaned: bz2's decompressor works over a
    # ~4 MB table that cleaning between its blocks would push out of the cache (cleaning
    # chunk by chunk as the pages came cost 10-20% more CPU, measured in one process).
    parts: list = []
    for i, unit in enumerate(units):
        pages = []
        for _, _, chunk, read_counts, _ in _unit_chunks(unit, skip if i == 0 else 0, settings):
            pages += chunk
            _add(counts, read_counts)
        records, more, bad = _clean_pages(pages, settings)
        parts.append(records)
        _add(counts, more)
        failed += bad
    payload: Any = b"".join(parts) if settings.as_json else [r for p in parts for r in p]
    return Batch((number + len(units), 0), done, payload, counts, failed)


def _chunk_job(task: tuple[list[tuple[str, str]], Settings]) -> tuple[Any, dict, list]:
    return _clean_pages(*task)


# --- the run ----------------------------------------------------------------------------------


def default_processes() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def site_namespaces(units: list[Unit]) -> frozenset:
    """The namespace names of the dump's `<siteinfo>` (read from the first stream of each
    multistream file; a whole file's reader learns them as it goes)."""
    names = set(DEFAULT_NAMESPACES)
    for unit in units:
        if not unit.whole and unit.start == 0:
            for _ in unit_pages(unit, names):
                pass
    return frozenset(names)


def task_ranges(units: list[Unit], first: int, processes: int) -> list[tuple[int, int]]:
    """How the workers share out `units[first:]`: consecutive ranges [a, b), one task each,
    in dump order. A whole file is a task alone. Streams are grouped by compressed bytes, at
    most TASK_BYTES and at most 1 / (TASKS_PER_WORKER * processes) of the bytes left (one
    stream bigger than that is a task alone): a real dump's ~0.1 MB streams go ~10 to a task,
    so a task's fixed cost stays small, and the tasks shrink toward the end, so the workers
    finish together. The output never depends on it (a task's records are its units', in
    order), and a stopped run's position is a unit, so any --processes continues any other's.

    >>> ranges = task_ranges(dump_units(["enwiki-multistream.xml.bz2"]), 0, 64)  # doctest: +SKIP
    >>> [b - a for a, b in ranges[:3]], [b - a for a, b in ranges[-3:]]        # doctest: +SKIP
    ([11, 10, 10], [1, 1, 1])
    """
    left = sum(u.end - u.start for u in units[first:])
    ranges, a = [], first
    while a < len(units):
        cap = max(1, min(TASK_BYTES, left // (TASKS_PER_WORKER * processes)))
        size, b = units[a].end - units[a].start, a + 1
        while (
            not units[a].whole
            and b < len(units)
            and not units[b].whole
            and size + units[b].end - units[b].start <= cap
        ):
            size, b = size + units[b].end - units[b].start, b + 1
        ranges.append((a, b))
        left, a = left - size, b
    return ranges


def wikipedia_batches(
    units: list[Unit],
    settings: Settings,
    processes: int | None = None,
    start: tuple[int, int] = (0, 0),
) -> Iterator[Batch]:
    """Batches of records of `units` from `start`, in dump order, the same for any
    `processes`. `units` from `dtl.data.dumps.dump_units`.

    >>> units = dump_units(["enwiki-multistream.xml.bz2"])                       # doctest: +SKIP
    >>> for batch in wikipedia_batches(units, Settings(), processes=4):          # doctest: +SKIP
    ...     print(batch.position, len(batch.payload))
    """
    processes = processes or default_processes()
    base = [0]
    for unit in units:  # compressed bytes before each unit
        base.append(base[-1] + unit.end - unit.start)
    streams = all(not u.whole for u in units)
    whole_files = settings.spool is not None and len(units) - start[0] >= processes > 1
    if streams or whole_files:  # the workers read their own units: no reader in front of them
        tasks = [
            (a, (a, tuple(units[a:b]), start[1] if a == start[0] else 0, settings))
            for a, b in task_ranges(units, start[0], processes)
        ]
        for a, batch in _in_order(_unit_job, tasks, processes, cost=_task_bytes):
            batch.done_bytes += base[a]
            yield batch
        return
    # One reader (this process) in front of the cleaning workers.
    for (number, position, offset, counts), result in _in_order(
        _chunk_job, _reader_chunks(units, settings, start), processes
    ):
        payload, more, failed = result
        yield Batch(position, base[number] + offset, payload, _add(counts, more), failed)


def _task_bytes(task: tuple[int, tuple[Unit, ...], int, Settings]) -> int:
    return sum(u.end - u.start for u in task[1])


def _reader_chunks(units: list[Unit], settings: Settings, start: tuple[int, int]) -> Iterator:
    """((unit, position after the chunk, offset, counts), (pages, settings)) in dump order."""
    for number in range(start[0], len(units)):
        skip = start[1] if number == start[0] else 0
        for read, offset, pages, counts, done in _unit_chunks(units[number], skip, settings):
            # a unit's last chunk hands on to the next unit
            position = (number + 1, 0) if done else (number, read)
            yield (number, position, offset, counts), (pages, settings)


class WorkerLost(DtlError):
    """A worker process died mid-task (killed, or out of memory): the run stops, a rerun of
    `dtl extract` continues from its last commit."""


def _in_order(
    fn: Any, tasks: Iterable[tuple[Any, Any]], processes: int, cost: Any = None
) -> Iterator:
    """(info, fn(task)) for each (info, task), in order, `processes` at a time. Workers take
    the next task as they come free. With `cost` (a task's size; `tasks` then a list), the
    last tasks, once they fit in the window, are handed out largest first: the small ones
    fill in at the end, so no core waits long on the last big one. Results still come back
    in task order."""
    if processes <= 1:
        for info, task in tasks:
            yield info, fn(task)
        return
    # A bounded window of tasks in flight (map would run ahead of the writer without bound).
    # fork where there is one: workers start at once and a user's script needs no __main__
    # guard; they run only pure-Python reading and cleaning. An executor, not a Pool: a
    # worker that dies is an error here, where a Pool would wait for its task forever.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_die_with_parent)
    window = 4 * processes
    left = list(tasks) if cost is not None else None
    todo = iter(tasks if left is None else left)
    finished = False
    try:
        pending: deque = deque()  # (info, future) in task order
        for number, (info, task) in enumerate(todo):
            if left is not None and len(left) - number <= window:
                # The last ones: submitted together, largest first; yielded in task order.
                last = left[number:]
                futures = {}
                for i in sorted(range(len(last)), key=lambda i: -cost(last[i][1])):
                    futures[i] = pool.submit(fn, last[i][1])
                pending.extend((last[i][0], futures[i]) for i in range(len(last)))
                break
            pending.append((info, pool.submit(fn, task)))
            if len(pending) >= window:
                info, future = pending.popleft()
                yield info, future.result()
        while pending:
            info, future = pending.popleft()
            yield info, future.result()
        finished = True
    except BrokenProcessPool:
        raise WorkerLost(
            "a worker process died (killed, or out of memory?); run the same command again to "
            "continue from the last commit, with fewer --processes if memory ran out"
        ) from None
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)
        if not finished:  # stopped early (an error, Ctrl-C, a consumer that broke off)
            workers = list((getattr(pool, "_processes", None) or {}).values())
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.join(timeout=10)


def _die_with_parent() -> None:
    """Worker start: on Linux, die when the parent dies (a SIGKILLed extract leaves no idle
    workers behind)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def iter_wikipedia(
    path: str | os.PathLike | list,
    processes: int | None = None,
    stats: dict | None = None,
    keep_disambiguation: bool = False,
    min_chars: int = 1,
    index: str | os.PathLike | None = "auto",
) -> Iterator[dict]:
    """Clean `{title, text, sections}` records of a dump's articles, in dump order.

    `path`: a dump file, a folder of parts, or a list of them; a multistream dump is read
    stream by stream when its index is beside it (`index`: see `dtl.data.dumps.dump_units`). `stats` (if given) is filled with pages /
    articles / redirects / other_namespace / disambiguation / failed / empty counts and the
    failed titles.
    """
    counts = stats if stats is not None else {}
    counts.update(_zero_counts())
    counts["failed_titles"] = []
    units = dump_units(path if isinstance(path, list) else [path], index)
    settings = Settings(keep_disambiguation, min_chars, namespaces=site_namespaces(units))
    for batch in wikipedia_batches(units, settings, processes):
        _add_batch(counts, batch)
        yield from batch.payload


def _add_batch(counts: dict, batch: Batch) -> None:
    """Add a batch's counts and failures to a run's (failures logged on stderr)."""
    for key in COUNTS:
        counts[key] += batch.counts[key]
    for title, error in batch.failed:
        counts["failed_titles"].append(title)
        print(f"dtl extract: skipped page {title!r}: {error}", file=sys.stderr)
