"""Shared fixtures.

The real data lives in `../shared/data/` beside the project root. A user's clone has no such
folder: tests that need it skip there with the reason, and fail under CI=true, so CI never
passes by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """Path to a file in ../shared/data, skipping (or failing under CI) when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared data {path} is not here (it sits beside the project root in CI)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def gpt2_dir() -> Path:
    """The official GPT-2 BPE files (encoder.json + vocab.bpe)."""
    return shared_path("gpt2")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    import torch

    torch.manual_seed(0)
    yield
