"""Helpers shared by the data tests (a module of its own: tests/ is not a package)."""

from __future__ import annotations

from testkit import run_cli, shared_path  # noqa: F401 (re-exported for the data tests)

# What a cleaned article must never contain (the list).
REMNANTS = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "&lt;", "'''")
