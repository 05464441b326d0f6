"""Helpers shared by the data tests (a module of its own: tests/ is not a package)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ENWIKI = ("enwiki-sample", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
WIKITEXT = ("wikitext-2-raw", "wiki.test.raw")
SQUAD = ("squad", "squad-v2-dev-small.json")
# What a cleaned article must never contain (the list).
REMNANTS = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "&lt;", "'''")


def shared_path(*parts: str) -> Path:
    """As tests/conftest.py's: skip locally, fail under CI=true, when the file is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared data {path} is not here (it sits beside the project root in CI)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`dtl ARGV` in-process: (exit code, stdout, stderr)."""
    from dtl.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err
