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


def _args(data, out, batch, steps=4):
    # A constant lr after warmup: the schedule does not depend on --max-steps, so a run of 4
    # steps resumed to 6 can be compared with a run of 6. No dropout: each rank draws masks for
    # its own rows from the same RNG, so masks differ from one process's for all 4 rows.
    return ["train", "--data", str(data), "--out", str(out), *model_flags(),
            "--max-steps", str(steps), "--batch-size", str(batch), "--log-every", "1",
            "--eval-every", "2", "--eval-batches", "2", "--save-every", "4", "--lr", "3e-3",
            "--warmup-steps", "2", "--schedule", "constant", "--dropout", "0",
            "--device", "cpu", "--no-progress"]


def _torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *DTL[1:], *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=PROJECT_ROOT,
                          env={**os.environ, **SUBPROCESS_ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_equal_one_process_with_twice_the_batch_and_resume(padded_data, tmp_path):
    single = run_dtl(*_args(padded_data, tmp_path / "one", 4, steps=6))
    assert single.returncode == 0, single.stderr
    _torchrun(*_args(padded_data, tmp_path / "two", 2))

    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one if r["step"] <= 4]  # rank 0 only
    for a, b in zip(one, two, strict=False):
        key = "val_loss" if "val_loss" in a else "loss"
        assert b[key] == pytest.approx(a[key], abs=1e-5), (a, b)
    assert two[0]["tokens"] == one[0]["tokens"]  # 2 ranks x 2 rows == 1 x 4 rows

    latest = latest_checkpoint(tmp_path / "two")
    model = TransformerLM.from_pretrained(latest)
    assert model.config.d_model == 32 and model.config.vocab_size == 512
    assert load_training_state(latest)["world_size"] == 2

    # Resume the 2-process run to step 6: it continues as the 1-process run did (optimizer,
    # data position, step; the RNG round trip is the SIGKILL test's, with dropout on).
    _torchrun("train", "--resume", str(tmp_path / "two"), "--max-steps", "6", "--no-progress")
    resumed = _records(tmp_path / "two")
    assert [r["step"] for r in resumed] == [r["step"] for r in one]
    for a, b in zip(one, resumed, strict=True):
        key = "val_loss" if "val_loss" in a else "loss"
        assert b[key] == pytest.approx(a[key], abs=1e-5), (a, b)
