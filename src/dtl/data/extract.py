"""`dtl extract`: one source -> a records JSONL file, streamed and written atomically.

>>> summary = extract("wiki.test.raw", "wt.jsonl", "wikitext")   # doctest: +SKIP
>>> summary["records"]                                            # doctest: +SKIP
62
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from dtl.data.sources import check_inputs, detect_kind, iter_records_counting
from dtl.errors import DtlError
from dtl.fileio import disk_full_as_error, remove_stale


def extract(
    source: str | os.PathLike,
    out: str | os.PathLike,
    kind: str | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Write the records of `source` to `out` (a temp name renamed at the end; '-' = stdout)."""
    started = time.perf_counter()
    kind = kind or detect_kind(source)
    check_inputs([source])
    stats: dict[str, Any] = {}
    records = iter_records_counting(source, kind, stats, **options)
    bar = tqdm(
        desc="extract", unit=" rec", disable=not progress, file=sys.stderr, dynamic_ncols=True
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
