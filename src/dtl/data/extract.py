"""`dtl extract`: one source -> a records JSONL file, streamed and written atomically.

>>> summary = extract("wiki.test.raw", "wt.jsonl", "wikitext")   # doctest: +SKIP
>>> summary["records"]                                            # doctest: +SKIP
62
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dtl.data.sources import check_input, detect_kind, iter_records
from dtl.errors import DtlError


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
    if not str(source).startswith("hf:"):
        check_input(source)
    stats: dict[str, Any] = {}
    if kind == "wikipedia":
        options.setdefault("stats", stats)
    records = iter_records(source, kind, **options)
    bar = tqdm(
        desc="extract", unit=" rec", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    count = 0
    if str(out) == "-":
        for rec in records:
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
            bar.update()
    else:
        path = Path(out)
        if path.is_dir():
            raise DtlError(
                f"-o {path} is a directory; give a file name such as {path / 'records.jsonl'}"
            )
        if not path.resolve().parent.is_dir():
            raise DtlError(f"-o {path}: the folder {path.parent} does not exist")
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    count += 1
                    bar.update()
            if count == 0:
                raise DtlError(f"{source}: no records came out of this {kind} source; check --kind")
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
