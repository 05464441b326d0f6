"""Reading text files line by line with a clear error on bad bytes, and writing files so that
a crash never leaves a half-written one under the real name.

>>> atomic_write_text(Path("notes.txt"), "done\\n")  # doctest: +SKIP
>>> [line for line in read_lines(Path("notes.txt"))]    # doctest: +SKIP
['done']
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from dtl.errors import DtlError


def read_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file without their LF / CRLF, streamed; bad bytes name the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DtlError(
                    f"{path}: line {number} is not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                    f"{err.start + 1}); convert the file, e.g. iconv -f latin1 -t utf-8"
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield line.rstrip("\r\n")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a fresh temporary name beside `path` (unique per writer), then
    rename it onto `path`; on any error the temporary file is removed and `path` untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
