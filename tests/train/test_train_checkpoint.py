"""Checkpoint files: atomic, code-free to load, and a faithful RNG round trip."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from dtl import ModelConfig, TransformerLM
from dtl.errors import DtlError
from dtl.fileio import DiskFullError
from dtl.run_dir import latest_checkpoint, list_checkpoints
from dtl.train.checkpoint import load_training_state, rng_state, save_checkpoint, set_rng_state


def _model():
    return TransformerLM(
        ModelConfig.preset(
            "tiny", vocab_size=32, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_seq_length=8
        )
    )


class _BrokenTokenizer:
    """A tokenizer whose save dies half-way, like a full disk or a crash mid-save."""

    def save(self, directory):
        (directory / "vocab.json").write_text("{")
        raise OSError(28, "No space left on device")


def test_crash_mid_save_leaves_the_previous_checkpoint_latest(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, 1, model, {"step": 1})
    # A full disk is one line naming the checkpoint being written (DiskFullError).
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*step-2"):
        save_checkpoint(tmp_path, 2, model, {"step": 2}, tokenizer=_BrokenTokenizer())
    assert latest_checkpoint(tmp_path).name == "step-1"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "latest.txt",
        "step-1",
    ]  # no half-written step-2, no temporary left
    assert load_training_state(latest_checkpoint(tmp_path)) == {"step": 1}


def test_resave_of_a_step_replaces_it_whole(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, 3, model, {"v": 1})
    save_checkpoint(tmp_path, 3, model, {"v": 2})
    assert load_training_state(tmp_path / "checkpoints" / "step-3") == {"v": 2}
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "step-3"


def test_latest_without_symlink_uses_latest_txt(tmp_path):
    model = _model()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {"step": step})
    (tmp_path / "checkpoints" / "latest").unlink()  # e.g. a filesystem without symlinks
    assert latest_checkpoint(tmp_path).name == "step-2"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_a_state_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    with open(ckpt / "training_state.pt", "wb") as f:
        pickle.dump({"step": _Exploit()}, f, protocol=2)
    with pytest.raises(DtlError, match="unreadable training state"):
        load_training_state(ckpt)
    assert not (tmp_path / "pwned").exists()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])
