"""A Wikipedia dump's layout: its files, its bz2 streams, and the byte ranges a worker reads.

>>> units = dump_units(["enwiki-latest-pages-articles-multistream.xml.bz2"])  # doctest: +SKIP
>>> units[1]                                                                   # doctest: +SKIP
Unit(path='enwiki-...-multistream.xml.bz2', start=597, end=648210, size=..., whole=False)

Wikimedia publishes the articles in two shapes:
- `X-multistream.xml.bz2`: many independent bz2 streams back to back, the first holding
  `<mediawiki><siteinfo>`, each of the others about 100 `<page>`s, the last `</mediawiki>`;
  beside it `X-multistream-index.txt.bz2`, one `offset:page_id:title` line a page, `offset`
  the byte where the page's stream starts. Each stream is a unit here: any process can seek
  to it and decompress it alone, so no single reader stands in front of the workers.
- `pages-articles.xml.bz2`, or parts of it (`pages-articles1.xml-p1p41242.bz2`, ...): each
  file is read from its start as one document (a unit of its own).
A folder is read as its dump files in part order (1, 2, ..., 10, not 1, 10, 2).
"""

from __future__ import annotations

import bz2
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from dtl.errors import DtlError

BLOCK = 64 * 1024  # bytes read (and decompressed) at a time: memory stays flat
_DUMP_NAME = re.compile(r"\.xml(\.bz2)?$|\.xml-p\d+p\d+\.bz2$|\.bz2$")
_INDEX_NAME = re.compile(r"-index\d*\.txt")
# offset:page_id:title lines, a run of them with one offset (a stream's pages) at a time: the
# English index's 24M lines become 240k matches, no Python object per line.
_INDEX_RUN = re.compile(rb"(?m)^(\d+):\d+:[^\n]*\n(?:\1:\d+:[^\n]*\n)*")
SPOT_CHECKS = 64  # index offsets checked against the dump before any work (workers check all)


@dataclass(frozen=True)
class Unit:
    """A piece of a dump that one worker reads alone: bytes [start, end) of `path`.

    `whole`: the whole file, read as one XML document (a plain or single-stream dump);
    otherwise one stream of a multistream dump (pages without their `<mediawiki>` root).
    """

    path: str
    start: int
    end: int
    size: int  # the file's size
    whole: bool


def natural_key(name: str) -> list:
    """Sort key that puts part 2 before part 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def dump_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The dump files named: files as given, folders as their dump files in part order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DtlError(f"{path}: no such file")
        if path.is_dir():
            found = [
                p
                for p in path.iterdir()
                if p.is_file() and _DUMP_NAME.search(p.name) and not _INDEX_NAME.search(p.name)
            ]
            if not found:
                raise DtlError(
                    f"{path}: no dump files (*.xml, *.xml.bz2, *.xml-p1p2.bz2) in this folder"
                )
            files.extend(sorted(found, key=lambda p: natural_key(p.name)))
        else:
            files.append(path)
    for path in files:
        if path.stat().st_size == 0:
            raise DtlError(f"{path}: the file is empty")
    return files


def index_beside(path: Path) -> Path | None:
    """Where a multistream dump's index sits by Wikimedia's naming, or None for other dumps:
    `X-multistream.xml.bz2` -> `X-multistream-index.txt.bz2`,
    `X-multistream1.xml-p1p41242.bz2` -> `X-multistream-index1.txt-p1p41242.bz2`."""
    name = path.name
    if "multistream" not in name or _INDEX_NAME.search(name):
        return None
    return path.with_name(
        name.replace("multistream", "multistream-index", 1).replace(".xml", ".txt", 1)
    )


def dump_units(
    inputs: Iterable[str | os.PathLike], index: str | os.PathLike | None = None
) -> list[Unit]:
    """The units of a dump, in dump order: one per stream of a multistream file with its
    index, one per file otherwise. `index`: None (a multistream file's index must be beside
    it), "auto" (beside it if there, else read the file as one document), "none" (always read
    it as one document), or the path of a single multistream file's index."""
    files = dump_files(inputs)
    if index is not None and str(index) not in ("none", "auto") and len(files) != 1:
        raise DtlError(
            f"--index names the index of one dump file, but {len(files)} were given; with "
            "several, put each index beside its file under Wikimedia's name"
        )
    units: list[Unit] = []
    for path in files:
        size = path.stat().st_size
        if str(index) == "none":
            found = None
        elif str(index) == "auto":
            found = index_beside(path)
            found = found if found is not None and found.is_file() else None
        elif index is not None:
            found = Path(index)
            if not found.is_file():
                raise DtlError(f"--index {found}: no such file")
        else:
            found = index_beside(path)
            if found is not None and not found.is_file():
                raise DtlError(
                    f"{path}: its index {found.name} is not beside it; download it too, name it "
                    "with --index PATH, or pass --index none to read the dump as one stream "
                    "(one process decompresses it)"
                )
        if found is None:
            units.append(Unit(str(path), 0, size, size, True))
            continue
        offsets = read_index(found, path, size)
        bounds = sorted(set(offsets) | {0, size})
        units += [Unit(str(path), a, b, size, False) for a, b in pairwise(bounds)]
    return units


def read_index(index: Path, dump: Path, size: int) -> list[int]:
    """The stream offsets a multistream index lists, checked against the dump: increasing,
    inside the file, and (spot checks) at the start of a bz2 stream."""
    try:
        offsets = _index_offsets(index)
    except (OSError, EOFError, ValueError) as err:
        raise DtlError(f"{index}: cannot read this index ({err}); download it again") from None
    if not offsets:
        raise DtlError(f"{index}: not a multistream index (no 'offset:page_id:title' lines)")
    mismatch = f"{index} does not match {dump.name}"
    if any(b <= a for a, b in pairwise(offsets)):
        raise DtlError(
            f"{mismatch}: its offsets are not in order; use the index published with this dump"
        )
    if offsets[-1] >= size:
        raise DtlError(
            f"{dump}: the file ends at byte {size:,} but its index lists a stream at byte "
            f"{offsets[-1]:,} (truncated download?); download the dump again"
        )
    # Spot checks (the first, the last, SPOT_CHECKS spread between) refuse a wrong index
    # before any work; each worker checks its own streams' starts as it reads them, so the
    # English dump's 240k streams cost no seek each in front of the workers.
    step = max(1, len(offsets) // SPOT_CHECKS)
    with open(dump, "rb") as f:
        for offset in sorted({*offsets[::step], offsets[-1]}):
            f.seek(offset)
            if f.read(3) != b"BZh":
                raise DtlError(
                    f"{mismatch}: no bz2 stream starts at byte {offset}; use the index "
                    "published with this dump"
                )
    return offsets


def _index_offsets(index: Path) -> list[int]:
    """The distinct stream offsets of an index, in order, read block by block (the English
    index is ~1 GB of text: its 24M lines are never held at once)."""
    offsets: list[int] = []
    last, tail = b"", b""
    with open(index, "rb") as f:
        raw = iter(lambda: f.read(1 << 20), b"")
        for block in bz2_blocks(raw) if _is_bz2(index) else raw:
            data = tail + block
            cut = data.rfind(b"\n") + 1
            data, tail = data[:cut], data[cut:]
            # Consecutive pages share their stream's offset: keep each offset once, in order
            # (a run cut by a block's end starts the next block with the same offset).
            for offset in _INDEX_RUN.findall(data):
                if offset != last:
                    offsets.append(int(offset))
                    last = offset
    for offset in _INDEX_RUN.findall(tail + b"\n"):
        if offset != last:
            offsets.append(int(offset))
            last = offset
    return offsets


def _is_bz2(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == b"BZh"


def read_unit(unit: Unit) -> Iterator[tuple[bytes, int]]:
    """The XML of a unit in blocks, each with how many of its compressed bytes are read so
    far. A stream unit comes wrapped in `<mediawiki>` ... `</mediawiki>` (the root's open and
    close tags live in the dump's first and last streams), so it parses as a document."""
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        compressed = _is_bz2_at(f, unit)

        def raw() -> Iterator[bytes]:
            left = unit.end - unit.start
            while left > 0:
                block = f.read(min(BLOCK, left))
                if not block:
                    return
                left -= len(block)
                yield block

        if not unit.whole and unit.start != 0:
            yield b"<mediawiki>", 0
        blocks = bz2_blocks(raw()) if compressed else raw()
        for block in blocks:
            yield block, f.tell() - unit.start
        if not unit.whole and unit.end != unit.size:
            yield b"</mediawiki>", unit.end - unit.start


def _is_bz2_at(f, unit: Unit) -> bool:
    magic = f.read(3)
    f.seek(unit.start)
    if not unit.whole and magic != b"BZh":
        raise DtlError(
            f"{unit.path}: no bz2 stream starts at byte {unit.start}; is the index this dump's?"
        )
    return magic == b"BZh"


def bz2_blocks(raw: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress back-to-back bz2 streams in bounded blocks; EOFError if the last one is cut."""
    d, fed = bz2.BZ2Decompressor(), False
    for data in raw:
        while True:
            out = d.decompress(data, max_length=BLOCK)
            fed, data = True, b""
            if out:
                yield out
            if d.eof:  # a stream ended: what follows is the next stream
                data, d, fed = d.unused_data, bz2.BZ2Decompressor(), False
                if not data:
                    break
            elif d.needs_input:
                break
    if fed and not d.eof:
        raise EOFError("compressed data ended before the end-of-stream marker")


# --- writing a multistream dump (tests and benchmarks build theirs with it) -----------------


def write_multistream(
    header: str,
    pages: Iterable[tuple[int, str, str]],
    path: str | os.PathLike,
    per_stream: int = 100,
) -> Path:
    """Write `header` (`<mediawiki ...><siteinfo>...</siteinfo>`), then the pages'
    XML (page_id, title, `<page>...</page>`) `per_stream` to a bz2 stream, then
    `</mediawiki>`, as Wikimedia lays out `X-multistream.xml.bz2`; and its index beside it.
    Returns the index's path.

    >>> write_multistream(head, [(10, "A", "<page>...</page>")], "t-multistream.xml.bz2")  # doctest: +SKIP
    PosixPath('t-multistream-index.txt.bz2')
    """
    path = Path(path)
    index_path = index_beside(path)
    if index_path is None:
        raise DtlError(f"{path}: a multistream dump's name holds 'multistream'")
    lines: list[str] = []
    with open(path, "wb") as out:
        out.write(bz2.compress(header.encode("utf-8")))
        batch: list[tuple[int, str, str]] = []

        def flush() -> None:
            offset = out.tell()
            out.write(bz2.compress("".join(xml for _, _, xml in batch).encode("utf-8")))
            lines.extend(f"{offset}:{page_id}:{title}\n" for page_id, title, _ in batch)
            batch.clear()

        for page in pages:
            batch.append(page)
            if len(batch) == per_stream:
                flush()
        if batch:
            flush()
        out.write(bz2.compress(b"\n</mediawiki>\n"))
    index_path.write_bytes(bz2.compress("".join(lines).encode("utf-8")))
    return index_path


def split_export(xml: str) -> tuple[str, list[tuple[int, str, str]]]:
    """A (small) single-document export as `write_multistream` takes it: the header before
    the first `<page>`, and each page's (id, title, XML).

    >>> header, pages = split_export(bz2.decompress(data).decode())  # doctest: +SKIP
    """
    first = xml.find("<page>")
    header = xml[:first] if first >= 0 else xml.rsplit("</mediawiki>", 1)[0]
    pages = []
    for match in re.finditer(r"<page>.*?</page>\s*", xml, re.S):
        page = match.group(0)
        found = re.search(r"<id>(\d+)</id>", page)
        title = re.search(r"<title>(.*?)</title>", page, re.S)
        pages.append((int(found.group(1)) if found else 0, title.group(1) if title else "", page))
    return header, pages
