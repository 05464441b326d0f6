"""What a user sees when something is wrong: one clear line, exit code 2, no traceback, and
nothing already saved is damaged."""

from __future__ import annotations

import hashlib
import resource

import pytest
from train_helpers import cli, fails_here, run_dtl, tiny_config, train_argv

from dtl.errors import DtlError
from dtl.run_dir import latest_checkpoint
from dtl.train import train


def _fails(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("dtl train: error: ")
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _digest(run_dir):
    h = hashlib.sha256()
    for path in sorted((run_dir / "checkpoints").rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_not_a_prepared_dir(tmp_path):
    (tmp_path / "plain").mkdir()
    _fails(
        run_dtl(*train_argv(tmp_path / "plain", tmp_path / "run")),
        "not a prepared data dir",
        "dtl prepare",
    )


def test_missing_data_path(tmp_path, capsys):
    fails_here(
        capsys,
        train_argv(tmp_path / "missing" / "data.txt", tmp_path / "run"),
        "no such file or directory",
    )


def test_vocab_mismatch(packed_data, tmp_path, capsys):
    fails_here(
        capsys,
        train_argv(packed_data, tmp_path / "run", "--vocab-size", "100"),
        "vocab mismatch",
        "512",
    )


def test_unwritable_run_dir(packed_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    fails_here(capsys, train_argv(packed_data, blocker / "run"), "cannot write to run dir")
    fails_here(capsys, train_argv(packed_data, blocker), "is a file")


def test_fsdp_without_torchrun(packed_data, tmp_path, capsys):
    fails_here(
        capsys,
        train_argv(packed_data, tmp_path / "run", "--fsdp"),
        "--fsdp needs several processes",
        "torchrun --nproc_per_node",
    )
    assert not (tmp_path / "run").exists()


def test_existing_run_and_incompatible_resume_leave_checkpoints_alone(
    packed_data, tmp_path, capsys
):
    run = tmp_path / "run"
    assert cli(train_argv(packed_data, run), capsys)[0] == 0
    before = _digest(run)
    fails_here(capsys, train_argv(packed_data, run), "already holds a run", "--resume")
    fails_here(
        capsys, ["train", "--resume", str(run), "--d-model", "64"], "cannot resume", "d_model"
    )
    fails_here(
        capsys,
        ["train", "--resume", str(run), "--batch-size", "3"],
        "cannot resume",
        "different batch_size (batch_size: 2 -> 3)",
        "start a new --out",
    )
    fails_here(capsys, ["train", "--resume", str(tmp_path / "nothing")], "no config.yaml")
    assert _digest(run) == before


def test_nonfinite_loss_stops_naming_step_and_checkpoint(packed_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(packed_data, run, max_steps=2))
    good = latest_checkpoint(run)
    before = _digest(run)
    # An absurd learning rate blows the weights up: the next loss is inf/nan.
    cfg = tiny_config(packed_data, run, max_steps=6, lr=1e30, warmup_steps=0)
    with pytest.raises(DtlError, match=r"at step [34].*last good checkpoint: .*step-2") as err:
        train(cfg, resume=True)
    assert str(good) in str(err.value)
    assert _digest(run) == before


def test_skip_nonfinite_allows_only_n_bad_steps(packed_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(packed_data, run, max_steps=2))
    cfg = tiny_config(packed_data, run, max_steps=20, lr=1e30, warmup_steps=0, skip_nonfinite=2)
    with pytest.raises(DtlError, match=r"at step ([56]):") as err:
        train(cfg, resume=True)
    plain = tiny_config(packed_data, run, max_steps=20, lr=1e30, warmup_steps=0)
    with pytest.raises(DtlError, match=r"at step (\d+):") as err_plain:
        train(plain, resume=True)
    # Two more steps than without skipping.
    step = int(str(err.value).split("at step ")[1].split(":")[0])
    plain_step = int(str(err_plain.value).split("at step ")[1].split(":")[0])
    assert step == plain_step + 2


def test_out_of_memory_is_caught_with_advice(packed_data, tmp_path):
    def limit_memory():  # a real allocation failure: cap the address space at 3 GiB
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    args = train_argv(packed_data, tmp_path / "run")
    args[args.index("--batch-size") + 1] = "2000"  # 1 GiB per activation: fails at once
    args[args.index("--d-model") + 1] = "4096"
    args[args.index("--n-layers") + 1] = "1"
    result = run_dtl(*args, preexec_fn=limit_memory)
    # The advice names the rows as resolved: the data's max_length, 32 (no --seq-len given).
    _fails(
        result,
        "out of memory with --batch-size 2000 x --seq-len 32",
        "lower --batch-size",
        "--grad-accum",
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
