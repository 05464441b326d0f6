"""Real prepared data dirs for the training tests: a 512-token BPE trained on the start of the
shared WikiText-2 test split, packed into 32-token rows (split by article), and SQuAD Q&A
rows padded to 48 tokens (unequal numbers of scored tokens per row)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import shared_path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    raw = shared_path("wikitext-2-raw", "wiki.test.raw").read_bytes()
    path = tmp_path_factory.mktemp("corpus") / "wiki-small.raw"
    path.write_bytes(raw[:300_000])
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    from dtl.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus], 512, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def packed_data(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    from dtl.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "wiki"
    prepare([corpus], out, tokenizer=str(tokenizer_dir), kind="wikitext", max_length=32,
            val_fraction=0.2, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def padded_data(tokenizer_dir, tmp_path_factory) -> Path:
    from dtl.data.prepare import prepare

    squad = shared_path("squad", "squad-v2-dev-small.json")
    out = tmp_path_factory.mktemp("data") / "squad"
    prepare([squad], out, tokenizer=str(tokenizer_dir), kind="squad", max_length=48,
            val_fraction=0.2, seed=0, progress=False)
    return out
