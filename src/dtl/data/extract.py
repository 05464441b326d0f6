"""`dtl extract`: one source -> a records JSONL file, streamed and written atomically.

>>> summary = extract("wiki.test.raw", "wt.jsonl", "wikitext")   # doctest: +SKIP
>>> summary["records"]                                            # doctest: +SKIP
62

A Wikipedia dump (one file, a list of parts or a folder of them) is resumable: the records go
to `.OUT.partial`, and after each second or so of work the file is synced to disk and
`.OUT.progress.json` records how far it holds (the dump position, its length, the counts),
replaced atomically. A killed run (SIGKILL included) rerun with the same inputs and options
cuts the partial file back to that length and continues from that position, so the finished
file equals an unbroken run's byte for byte; other inputs or options over a partial output are
refused (`force=True` starts over). The partial file is locked while a run writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from dtl.data.dumps import dump_files, dump_units
from dtl.data.sources import check_inputs, detect_kind, iter_records_counting
from dtl.data.wikipedia import (
    COUNTS,
    Settings,
    WorkerLost,
    iter_wikipedia,
    site_namespaces,
    wikipedia_batches,
)
from dtl.errors import DtlError
from dtl.fileio import DiskFullError, disk_full_as_error, remove_stale

COMMIT_SECONDS = 1.0  # how often a Wikipedia extract syncs its output and records its progress
# DTL_EXTRACT_COMMIT_SECONDS overrides it (0: after every batch): the resume tests kill a run
# after a given number of commits, which must not depend on how fast the machine is.
LOG_SECONDS = 30.0  # how often progress is a plain line when stderr is not a terminal


def extract(
    source: str | os.PathLike | list,
    out: str | os.PathLike,
    kind: str | None = None,
    progress: bool | str = True,
    **options: Any,
) -> dict[str, Any]:
    """Write the records of `source` to `out` (a temp name renamed at the end; '-' = stdout).

    `source`: a file or hf:NAME; for a Wikipedia dump also a folder of parts or a list of
    files. `progress`: True (a bar on a terminal, else plain lines), "bar", "log" or False.
    Wikipedia options: `processes`, `keep_disambiguation`, `index` (a multistream dump's
    index when it is not beside it, or "none"), `force` (start over a stopped run).
    """
    started = time.perf_counter()
    sources = [source] if not isinstance(source, list) else source
    several = len(sources) > 1 or any(
        Path(s).is_dir() for s in sources if isinstance(s, (str, os.PathLike))
    )
    kind = kind or ("wikipedia" if several else detect_kind(sources[0]))
    if progress is True:
        progress = "bar" if sys.stderr.isatty() else "log"
    if kind == "wikipedia":
        return _extract_wikipedia(sources, out, progress, started, **options)
    if several:
        raise DtlError(
            f"--kind {kind} reads one file; only a Wikipedia dump can be several files or a folder"
        )
    source = sources[0]
    check_inputs([source])
    stats: dict[str, Any] = {}
    records = iter_records_counting(source, kind, stats, **options)
    bar = tqdm(
        desc="extract", unit=" rec", disable=progress != "bar", file=sys.stderr, dynamic_ncols=True
    )
    if str(out) == "-":
        count = _write_jsonl(records, sys.stdout, bar)
    else:
        path = _check_out(Path(out))
        # What a killed extract to this same file left.
        remove_stale(path.parent, rf"^\.{re.escape(path.name)}\.partial-(?P<pid>\d+)$")
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with disk_full_as_error(path, "free space or choose another -o"):
                with open(tmp, "w", encoding="utf-8") as f:
                    count = _write_jsonl(records, f, bar)
                if count == 0:
                    raise DtlError(
                        f"{source}: no records came out of this {kind} source; check --kind"
                    )
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    bar.close()
    skipped = {k: v for k, v in stats.items() if k not in ("pages", "articles", "failed_titles")}
    return {
        "source": str(source),
        "kind": kind,
        "out": str(out),
        "records": count,
        "skipped": skipped,
        "failed_titles": stats.get("failed_titles", []),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _check_out(path: Path) -> Path:
    """`-o`, when it can be a records file: not a folder, in a folder that exists."""
    if path.is_dir():
        raise DtlError(
            f"-o {path} is a directory; give a file name such as {path / 'records.jsonl'}"
        )
    if not path.resolve().parent.is_dir():
        raise DtlError(f"-o {path}: the folder {path.parent} does not exist")
    return path


def _write_jsonl(records: Iterable[dict], f: TextIO, bar: tqdm) -> int:
    """One JSON object a line, non-ASCII kept as is; returns how many were written."""
    count = 0
    for rec in records:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        count += 1
        bar.update()
    return count


# --- Wikipedia dumps: parallel over the dump's units, resumable ---------------------------------


def _extract_wikipedia(
    sources: list,
    out: str | os.PathLike,
    progress: str | bool,
    started: float,
    processes: int | None = None,
    keep_disambiguation: bool = False,
    index: str | os.PathLike | None = None,
    force: bool = False,
    stats: dict | None = None,
) -> dict[str, Any]:
    names = ", ".join(str(s) for s in sources)
    counts: dict[str, Any] = stats if stats is not None else {}
    if str(out) == "-":  # a stream: nothing to resume
        records = iter_wikipedia(sources, processes, counts, keep_disambiguation, index=index)
        count = _write_jsonl(records, sys.stdout, tqdm(disable=True))
        return _summary(names, out, count, counts, started)
    path = _check_out(Path(out))
    units = dump_units(sources, index)
    # Workers spool whole files' lines here (parts shared out by file); streams need none.
    spool = path.with_name(f".{path.name}.spool") if any(u.whole for u in units) else None
    settings = Settings(
        keep_disambiguation,
        as_json=True,
        namespaces=site_namespaces(units),
        spool=str(spool) if spool else None,
    )
    fingerprint = _fingerprint(dump_files(sources), units, settings)
    partial = path.with_name(f".{path.name}.partial")
    record = path.with_name(f".{path.name}.progress.json")
    advice = "free space or choose another -o (a rerun continues where this one stopped)"
    with disk_full_as_error(path, advice), open(partial, "ab+") as f:
        _lock(f, path, partial)
        # Before the try: a refusal leaves the stopped run's files for the rerun it asks for.
        state = _resume_state(record, partial, fingerprint, force, path)
        try:
            if spool:
                spool.mkdir(exist_ok=True)
            count = _write_batches(f, units, settings, processes, state, counts, progress, record)
            if count == 0:
                raise DtlError(
                    f"{names}: no records came out of this wikipedia source; check --kind"
                )
            os.replace(partial, path)
        except BaseException as err:
            # A bad input fails the same way again: leave nothing behind. A stop (Ctrl-C, a
            # full disk, a worker killed) keeps what was committed for the rerun to continue.
            bad_input = isinstance(err, DtlError) and not isinstance(
                err, (DiskFullError, WorkerLost)
            )
            if bad_input or not record.exists():
                partial.unlink(missing_ok=True)
                record.unlink(missing_ok=True)
                if spool:
                    shutil.rmtree(spool, ignore_errors=True)
            raise
    record.unlink(missing_ok=True)
    if spool:
        shutil.rmtree(spool, ignore_errors=True)
    return _summary(names, out, count, counts, started)


def _write_batches(
    f: Any,
    units: list,
    settings: Settings,
    processes: int | None,
    state: dict,
    counts: dict,
    progress: str | bool,
    record: Path,
) -> int:
    """Append the records from `state`'s position on to `f`, committing as it goes; returns
    how many records the file holds."""
    f.truncate(state["bytes"])
    f.seek(state["bytes"])
    counts.update(state["counts"])
    counts["failed_titles"] = state["failed_titles"]
    count = state["records"]
    total = sum(u.end - u.start for u in units)
    meter = _Meter(total, progress, state["done_bytes"], counts["articles"])
    if state["position"] != [0, 0]:
        print(
            f"dtl extract: continuing the stopped run at {_size(state['done_bytes'])} of "
            f"{_size(total)} ({100 * state['done_bytes'] / max(total, 1):.0f}%)",
            file=sys.stderr,
        )
    last_commit = time.monotonic()
    every = float(os.environ.get("DTL_EXTRACT_COMMIT_SECONDS", COMMIT_SECONDS))
    start = (state["position"][0], state["position"][1])
    for batch in wikipedia_batches(units, settings, processes, start):
        count += _write_payload(batch.payload, f)
        for key in COUNTS:
            counts[key] += batch.counts[key]
        for title, error in batch.failed:
            counts["failed_titles"].append(title)
            print(f"dtl extract: skipped page {title!r}: {error}", file=sys.stderr)
        meter.update(batch.done_bytes, counts["articles"])
        if time.monotonic() - last_commit >= every:
            _commit(f, record, state["fingerprint"], batch, count, counts)
            last_commit = time.monotonic()
    meter.close()
    f.flush()
    os.fsync(f.fileno())
    return count


def _summary(names: str, out: Any, count: int, counts: dict, started: float) -> dict[str, Any]:
    skipped = {k: v for k, v in counts.items() if k not in ("pages", "articles", "failed_titles")}
    return {
        "source": names,
        "kind": "wikipedia",
        "out": str(out),
        "records": count,
        "skipped": skipped,
        "failed_titles": counts.get("failed_titles", []),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _fingerprint(files: list[Path], units: list, settings: Settings) -> str:
    """What decides the output: the dump files (path, size, modification time), their units
    (so its index) and the options. A rerun continues only under the same fingerprint."""
    layout = hashlib.sha256(repr([(u.path, u.start, u.end) for u in units]).encode()).hexdigest()
    described = {
        "format": 1,
        "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "units": layout,
        "keep_disambiguation": settings.keep_disambiguation,
        "min_chars": settings.min_chars,
    }
    return json.dumps(described, sort_keys=True)


def _lock(f: Any, path: Path, partial: Path) -> None:
    """One writer per output: a second run on the same -o stops at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run at a time is up to the user
        return
    try:
        # A POSIX record lock: this process's own, not inherited by the forked workers (an
        # flock would live on in them), and gone when it dies, SIGKILL included.
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DtlError(
            f"-o {path}: another dtl extract is writing it ({partial.name} is locked); wait for "
            "it to finish or choose another -o"
        ) from None


def _resume_state(record: Path, partial: Path, fingerprint: str, force: bool, path: Path) -> dict:
    """Where to start: a stopped run's recorded progress, or the beginning."""
    fresh = {
        "position": [0, 0],
        "bytes": 0,
        "done_bytes": 0,
        "records": 0,
        "counts": dict.fromkeys(COUNTS, 0),
        "failed_titles": [],
    }
    fresh["fingerprint"] = fingerprint
    if force:
        record.unlink(missing_ok=True)  # its position no longer describes the partial file
    if force or not record.exists():
        return fresh
    try:
        state = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return fresh  # a record that never finished being written: start over
    if state.get("fingerprint") != fingerprint:
        raise DtlError(
            f"-o {path}: a stopped extract of other inputs or options is here ({partial.name}); "
            "rerun that command to finish it, or add --force to start over"
        )
    if partial.stat().st_size < state["bytes"]:
        return fresh  # the partial file lost what the record says it holds
    return state


def _commit(f: Any, record: Path, fingerprint: str, batch: Any, count: int, counts: dict) -> None:
    """Sync what is written, then record it (atomically): a kill after this resumes here."""
    f.flush()
    os.fsync(f.fileno())
    state = {
        "fingerprint": fingerprint,
        "position": list(batch.position),
        "bytes": f.tell(),
        "done_bytes": batch.done_bytes,
        "records": count,
        "counts": {k: counts[k] for k in COUNTS},
        "failed_titles": counts["failed_titles"],
    }
    tmp = record.with_name(record.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(state, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, record)


def _write_payload(payload: Any, f: Any) -> int:
    """Append a batch's JSON lines (bytes, or a worker's spool file); returns how many."""
    if isinstance(payload, bytes):
        f.write(payload)
        return payload.count(b"\n")
    lines = 0
    with open(payload, "rb") as spool:
        while block := spool.read(1 << 20):
            f.write(block)
            lines += block.count(b"\n")
    os.unlink(payload)
    return lines


def _clock(seconds: float) -> str:
    """H:MM:SS, hours unbounded (a whole dump can take more than a day on one core)."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


class _Meter:
    """Progress through a dump's compressed bytes: a tqdm bar with MB/s, articles/s and an ETA
    on a terminal ("bar"), a plain line every LOG_SECONDS in a log ("log"), or nothing."""

    def __init__(self, total: int, mode: str | bool, done: int, articles: int) -> None:
        self.total, self.mode, self.done = total, mode, done
        self.start_time, self.start_done, self.start_articles = time.monotonic(), done, articles
        self.last_line = self.start_time
        self.bar = None
        if mode == "bar":
            self.bar = tqdm(
                total=total,
                initial=done,
                desc="extract",
                unit="B",
                unit_scale=True,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def update(self, done: int, articles: int) -> None:
        now = time.monotonic()
        seconds = max(now - self.start_time, 1e-9)
        per_second = (articles - self.start_articles) / seconds
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix_str(
                f"{articles:,} articles, {per_second:,.0f} articles/s", refresh=False
            )
        elif self.mode == "log" and now - self.last_line >= LOG_SECONDS:
            rate = (done - self.start_done) / seconds
            eta = (self.total - done) / rate if rate > 0 else 0.0
            print(
                f"extract: {_size(done)} of {_size(self.total)} "
                f"({100 * done / max(self.total, 1):.1f}%), {_size(rate)}/s, "
                f"{articles:,} articles ({per_second:,.0f}/s), "
                f"ETA {_clock(eta)}",
                file=sys.stderr,
                flush=True,
            )
            self.last_line = now
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
