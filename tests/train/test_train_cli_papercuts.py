"""A newcomer's `dtl train` papercuts (issue 16): a log file without progress-bar frames, no
run dir left behind by a failed start, a config value that overflows, private training state."""

from __future__ import annotations

import json
import os
import stat
import subprocess

from train_helpers import DTL, PROJECT_ROOT, SUBPROCESS_ENV, cli, fails_here, train_argv


def test_train_into_a_log_file_has_no_progress_bar(packed_data, tmp_path):
    """`dtl train ... > log 2>&1`: plain lines only, the first one not glued to a bar frame."""
    log = tmp_path / "log"
    argv = train_argv(packed_data, tmp_path / "run", max_steps=4, log_every=1, progress=True)
    with open(log, "wb") as f:
        done = subprocess.run(
            [*DTL, *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env={**os.environ, **SUBPROCESS_ENV},
            timeout=120,
        )
    text = log.read_text(encoding="utf-8")
    assert done.returncode == 0, text
    assert "\r" not in text and "step/s" not in text and "it/s" not in text, text
    lines = text.splitlines()
    assert lines[0].startswith("threads: "), lines[:2]
    assert lines[1].startswith("training "), lines[:2]
    assert sum(line.startswith("step ") for line in lines) >= 4


def test_a_failed_start_leaves_no_run_dir(tmp_path, capsys):
    empty = tmp_path / "notes.txt"
    empty.write_text("", encoding="utf-8")
    # a bad --data, and a raw file that fails while being prepared into RUN/data
    fails_here(capsys, train_argv(tmp_path / "missing.txt", tmp_path / "runs" / "a"), "missing")
    assert not (tmp_path / "runs").exists()
    fails_here(capsys, train_argv(empty, tmp_path / "runs" / "b"), "notes.txt")
    assert not (tmp_path / "runs").exists()
    # a run dir that was there before is the user's: it stays
    (tmp_path / "mine").mkdir()
    fails_here(capsys, train_argv(tmp_path / "missing.txt", tmp_path / "mine"), "missing")
    assert (tmp_path / "mine").is_dir()


def test_a_config_number_too_big_for_a_float_is_one_line(packed_data, tmp_path, capsys):
    for key, kind in (("batch_size", "int"), ("lr", "float")):
        config = tmp_path / f"{key}.json"
        config.write_text(f'{{"{key}": 1e400}}', encoding="utf-8")  # JSON reads it as inf
        argv = train_argv(packed_data, tmp_path / "run", "--config", str(config))
        at = argv.index("--batch-size")  # the file's value, not a flag's, is read
        fails_here(capsys, argv[:at] + argv[at + 2 :], f"{key} must be {kind}, got inf")
    assert not (tmp_path / "run").exists()


def test_a_binary_config_file_is_one_line(packed_data, tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19")  # a pickle's first bytes
    fails_here(capsys, train_argv(packed_data, tmp_path / "run", "--config", str(evil)), "evil.pt")
    assert not (tmp_path / "run").exists()


def test_training_state_is_as_private_as_the_model_files(packed_data, tmp_path, capsys):
    code, _, err = cli(train_argv(packed_data, tmp_path / "run"), capsys)
    assert code == 0, err
    (step,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    for name in ("training_state.pt", "model.safetensors"):
        assert stat.S_IMODE((step / name).stat().st_mode) == 0o600, name
    assert json.loads((step / "config.json").read_text())["d_model"] == 32
