"""Helpers shared by the data tests (a module of its own: tests/ is not a package)."""

from __future__ import annotations

from testkit import run_cli, shared_path  # noqa: F401 (re-exported for the data tests)

ENWIKI = ("enwiki-sample", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
WIKITEXT = ("wikitext-2-raw", "wiki.test.raw")
SQUAD = ("squad", "squad-v2-dev-small.json")
# What a cleaned article must never contain (the list).
REMNANTS = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "&lt;", "'''")


