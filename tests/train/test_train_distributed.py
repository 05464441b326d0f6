"""Two real processes through torchrun (gloo on CPU): 2 ranks x batch B train exactly like
1 process x batch 2B, only rank 0 logs and saves, and the checkpoint loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_helpers import DTL, PROJECT_ROOT, SUBPROCESS_ENV, model_flags, run_dtl

from dtl import TransformerLM
from dtl.checkpoint import latest_checkpoint, load_training_state


def _args(data, out, batch):
    return ["train", "--data", str(data), "--out", str(out), *model_flags(), "--max-steps", "4",
            "--batch-size", str(batch), "--log-every", "1", "--eval-every", "4",
            "--eval-batches", "2", "--save-every", "4", "--lr", "3e-3", "--warmup-steps", "2",
            "--dropout", "0", "--device", "cpu", "--no-progress"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_with_twice_the_batch(padded_data, tmp_path):
    single = run_dtl(*_args(padded_data, tmp_path / "one", 4))
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", *DTL[1:], *_args(padded_data, tmp_path / "two", 2)]
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=180, cwd=PROJECT_ROOT,
                          env={**os.environ, **SUBPROCESS_ENV})
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one]  # rank 0 alone wrote lines
    for a, b in zip(one, two, strict=True):
        key = "val_loss" if "val_loss" in a else "loss"
        assert b[key] == pytest.approx(a[key], abs=1e-5), (a, b)
    assert two[0]["tokens"] == one[0]["tokens"]  # 2 ranks x 2 rows == 1 x 4 rows

    latest = latest_checkpoint(tmp_path / "two")
    model = TransformerLM.from_pretrained(latest)
    assert model.config.d_model == 32 and model.config.vocab_size == 512
    assert load_training_state(latest)["world_size"] == 2
