"""Real prepared data dirs for the training tests: a 512-token BPE trained on the start of the
shared WikiText-2 test split, packed into 32-token rows (and 64-token ones; split by
article), and SQuAD Q&A rows padded to 48 tokens (unequal numbers of scored tokens per row)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import prepared_rows, shared_path

from dtl.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    raw = shared_path("wikitext-2-raw", "wiki.test.raw").read_bytes()
    path = tmp_path_factory.mktemp("corpus") / "wiki-small.raw"
    path.write_bytes(raw[:300_000])
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus], 512, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def packed_data(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "wiki"
    return prepared_rows(corpus, "wikitext", 32, tokenizer_dir, out)


@pytest.fixture(scope="session")
def rows_of_64(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    """The same text as packed_data, in rows of max_length 64."""
    out = tmp_path_factory.mktemp("data") / "wiki64"
    return prepared_rows(corpus, "wikitext", 64, tokenizer_dir, out)


@pytest.fixture(scope="session")
def padded_data(tokenizer_dir, tmp_path_factory) -> Path:
    squad = shared_path("squad", "squad-v2-dev-small.json")
    out = tmp_path_factory.mktemp("data") / "squad"
    return prepared_rows(squad, "squad", 48, tokenizer_dir, out)
