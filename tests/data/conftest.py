"""Fixtures of the data tests: the real shared files, extracted once per session."""

from __future__ import annotations

import pytest
from testkit import ENWIKI, SQUAD, WIKITEXT, shared_path

from dtl.data.wikipedia import iter_wikipedia


@pytest.fixture(scope="session")
def enwiki_path():
    return shared_path(*ENWIKI)


@pytest.fixture(scope="session")
def wikitext_path():
    return shared_path(*WIKITEXT)


@pytest.fixture(scope="session")
def squad_path():
    return shared_path(*SQUAD)


@pytest.fixture(scope="session")
def enwiki(enwiki_path):
    """(records, stats) of the shared enwiki excerpt, cleaned with two processes."""
    stats: dict = {}
    records = list(iter_wikipedia(enwiki_path, processes=2, stats=stats))
    return records, stats
