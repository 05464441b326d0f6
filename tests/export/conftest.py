"""Fixtures for the export tests: a tiny model with a trained BPE, and a run dir around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from export_helpers import CORPUS, tiny_model

from dtl.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory) -> Path:
    """A model dir (config.json, model.safetensors, vocab.json + merges.txt) with a 320-token
    byte-level BPE trained by DTL."""
    root = tmp_path_factory.mktemp("bpe-model")
    (root / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    tok = train_tokenizer([root / "corpus.txt"], 320, root / "tok", show_progress=False)
    model_dir = root / "model"
    tiny_model(tok.vocab_size).save_pretrained(model_dir)
    tok.save(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, bpe_model_dir) -> Path:
    """A run dir as dtl train leaves it: config.yaml, metrics.jsonl and checkpoints/step-20
    (with step-30's metrics logged after it, which the card must not report)."""
    import shutil

    run = tmp_path_factory.mktemp("run")
    (run / "config.yaml").write_text(
        "data: notes.txt\npreset: tiny\nseq_len: 48\nbatch_size: 4\nlr: 0.001\nmax_steps: 30\n",
        encoding="utf-8",
    )
    records = [
        {"step": 10, "loss": 5.0, "tokens": 1920},
        {"step": 10, "val_loss": 4.5, "val_ppl": 90.0171313},
        {"step": 20, "loss": 4.0, "tokens": 3840},
        {"step": 20, "val_loss": 3.75, "val_ppl": 42.5210820},
        {"step": 30, "loss": 3.0, "tokens": 5760},
        {"step": 30, "val_loss": 3.25, "val_ppl": 25.7903399},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.copytree(bpe_model_dir, run / "checkpoints" / "step-20")
    (run / "checkpoints" / "latest").symlink_to("step-20", target_is_directory=True)
    return run
