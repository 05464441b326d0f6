"""Reading text files line by line with a clear error on bad bytes, and writing files so that
a crash never leaves a half-written one under the real name.

>>> atomic_write_text(Path("notes.txt"), "done\\n").name  # written beside, then renamed
'notes.txt'
>>> [line for line in read_lines(Path("notes.txt"))]
['done']
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


DISK_FULL_ADVICE = "free space or choose another output folder"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(DtlError):
    """A write ran out of space (or quota): one line naming what was being written."""

    def __init__(self, path: str | os.PathLike, advice: str = DISK_FULL_ADVICE) -> None:
        self.path, self.advice = Path(path), advice
        super().__init__(f"no space left on device writing {path}; {advice}")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a full disk or quota: an OSError
    ENOSPC/EDQUOT, or a Rust library's message of one (safetensors, tokenizers). torch.save
    to a Python file object says "unexpected pos", with the OSError as its context."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError):
            return True
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(err)
        if "No space left on device" in text or f"(os error {errno.ENOSPC})" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def disk_full_as_error(path: str | os.PathLike | None = None, advice: str | None = None):
    """Turn a full disk inside the block into one `DiskFullError` line: writing `path` (else
    the inner error's), and `advice` (else the inner error's), e.g. an outer
    `disk_full_as_error(advice="free space or choose another --out")` around a whole run.
    Other errors pass unchanged.

    >>> with disk_full_as_error(out_dir, "free space or choose another -o"):  # doctest: +SKIP
    ...     write_everything(out_dir)
    """
    try:
        yield
    except Exception as err:
        if not is_disk_full(err):
            raise
        inner = err if isinstance(err, DiskFullError) else None
        where = (
            path if path is not None else (inner.path if inner else getattr(err, "filename", None))
        )
        raise DiskFullError(
            where or "a file", advice or (inner.advice if inner else DISK_FULL_ADVICE)
        ) from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a fresh temporary name beside `path` (unique per writer), then
    rename it onto `path`; on any error the temporary file is removed and `path` untouched
    (a full disk is a `DiskFullError` naming `path`)."""
    path = Path(path)
    with disk_full_as_error(path):
        # The writer's pid in the name: what a killed one leaves can be told from a live one's.
        prefix = f".{path.name}.{os.getpid()}."
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs here (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(directory: str | os.PathLike, pattern: str | re.Pattern) -> list[Path]:
    """Remove the temporaries a killed writer left in `directory`: the entries whose name
    matches `pattern` (its group `pid`, the writer's process id) and whose writer is gone.

    A name holding a live process's id stays (that writer may still be at work), so two
    runs never delete each other's files. Returns what was removed.

    >>> remove_stale("runs/tiny/checkpoints", r"^\\.tmp-step-\\d+-(?P<pid>\\d+)$")  # doctest: +SKIP
    [PosixPath('runs/tiny/checkpoints/.tmp-step-500-4242')]
    """
    directory, pattern = Path(directory), re.compile(pattern)
    removed = []
    try:
        children = list(directory.iterdir())
    except OSError:  # no such folder yet, or unreadable: nothing of ours there
        return removed
    for child in children:
        m = pattern.match(child.name)
        # the pid is the group `pid` (or, in an alternative of the pattern, `pid2`)
        pid = m and int(m.group("pid") or m.groupdict().get("pid2") or 0)
        if not m or pid == os.getpid() or pid_alive(pid):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
    return removed
