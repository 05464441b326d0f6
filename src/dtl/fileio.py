"""Writing files so that a crash never leaves a half-written one under the real name.

>>> atomic_write_text(Path("notes.txt"), "done\\n")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


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
