"""What many test files share (importable from any of them: pyproject puts tests/ on the path;
conftest.py files cannot be imported by name, as several share it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path to a file in ../shared/data. A user's clone has no such folder: the test skips
    there with the reason, and fails under CI=true, so CI never passes by skipping."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared data {path} is not here (it sits beside the project root in CI)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """`dtl ARGV` in this process, as the console script runs it: (exit code, stdout, stderr)."""
    from dtl.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
