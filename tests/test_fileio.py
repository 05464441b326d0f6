"""`dtl.fileio`: removing what killed writers left, and a full disk as one error."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from dtl.errors import DtlError
from dtl.fileio import DiskFullError, atomic_write_text, disk_full_as_error, remove_stale

PATTERN = r"^\.out\.partial-(?P<pid>\d+)$"


def test_remove_stale_takes_only_dead_writers_matching_names(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead, live = proc.pid, os.getppid()  # pytest's parent runs while we do
    for name in (f".out.partial-{dead}", f".out.partial-{live}", f".out.partial-{os.getpid()}",
                 f".other.partial-{dead}", "out"):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x")
    removed = remove_stale(tmp_path, PATTERN)
    assert [p.name for p in removed] == [f".out.partial-{dead}"]
    left = {f".out.partial-{live}", f".out.partial-{os.getpid()}", f".other.partial-{dead}", "out"}
    assert set(os.listdir(tmp_path)) == left
    assert remove_stale(tmp_path / "missing", PATTERN) == []


def test_disk_full_as_error_names_the_outer_path_and_keeps_other_errors(tmp_path):
    with pytest.raises(DiskFullError) as caught, disk_full_as_error(tmp_path / "run", "free it"):
        with disk_full_as_error(tmp_path / "run" / "x"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == f"no space left on device writing {tmp_path / 'run'}; free it"
    with pytest.raises(DtlError, match="bad flag"), disk_full_as_error(tmp_path):
        raise DtlError("bad flag")
    with pytest.raises(PermissionError), disk_full_as_error(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_atomic_write_on_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old\n")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(target), "write_text", full)
    with pytest.raises(DiskFullError, match=f"writing {target}"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["config.yaml"] and target.read_text() == "old\n"
