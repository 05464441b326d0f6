"""Exact resume, proven with real processes: a run killed with SIGKILL (no chance to save)
and resumed logs the same losses as an uninterrupted run, to the last bit; Ctrl-C saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from train_helpers import DTL, PROJECT_ROOT, SUBPROCESS_ENV, run_dtl, train_argv


def _flags(data, out, steps=60):
    return train_argv(
        data,
        out,
        max_steps=steps,
        batch_size=4,
        log_every=1,
        eval_every=20,
        eval_batches=3,
        save_every=10,
        lr=3e-3,
        warmup_steps=5,
        dropout=0.1,
    )


def _losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        key = "val_loss" if "val_loss" in rec else "loss"
        out[(rec["step"], key)] = rec[key]
    return out


def _start(args):
    return subprocess.Popen(
        [*DTL, *args],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **SUBPROCESS_ENV},
    )


def _wait_for(predicate, proc, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def _latest_step(run_dir) -> int:
    txt = run_dir / "checkpoints" / "latest.txt"
    try:
        return int(txt.read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


def test_sigkill_then_resume_gives_identical_losses(packed_data, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_dtl(*_flags(packed_data, ref))
    assert done.returncode == 0, done.stderr

    proc = _start(_flags(packed_data, run))
    _wait_for(lambda: _latest_step(run) >= 20, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _latest_step(run)
    assert 20 <= killed_at < 60  # killed mid-run, after a few checkpoints

    resumed = run_dtl("train", "--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step-{killed_at}" in resumed.stdout
    ref_losses, run_losses = _losses(ref), _losses(run)
    assert len(ref_losses) == 60 + 3 and run_losses.keys() == ref_losses.keys()
    assert run_losses == ref_losses  # every train and val loss, bit for bit
    # And the printed lines after the resume point are the reference's lines.
    printed = [ln for ln in resumed.stdout.splitlines() if ln.startswith("step ")]
    ref_printed = [ln.split(" | ")[:2] for ln in done.stdout.splitlines() if ln.startswith("step ")]
    assert printed and all(ln.split(" | ")[:2] in ref_printed for ln in printed)


def test_ctrl_c_saves_the_current_step_and_says_how_to_resume(packed_data, tmp_path):
    run = tmp_path / "run"
    proc = _start(_flags(packed_data, run, steps=100000))
    _wait_for(
        lambda: (
            (run / "metrics.jsonl").is_file()
            and len((run / "metrics.jsonl").read_text().splitlines()) >= 15
        ),
        proc,
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last_logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert _latest_step(run) == last_logged  # the step it stopped after was saved
    assert f"dtl train --resume {run}" in out
