"""Helpers of the training tests (a module of its own: conftest.py files share one name)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from testkit import PROJECT_ROOT, run_cli, shared_path  # noqa: F401 (re-exported)

DTL = [sys.executable, "-m", "dtl"]  # the command line, as a user runs it
# One thread: tiny models run fastest, and steadiest on a busy machine, that way.
SUBPROCESS_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

TINY_MODEL = {"preset": "tiny", "d_model": 32, "n_heads": 2, "n_layers": 2, "d_ff": 64}


def tiny_config(data: Path, out: Path, **overrides):
    """A TrainConfig for a ~20k-parameter model that trains in a second."""
    from dtl.train import TrainConfig

    settings = {
        **TINY_MODEL,
        "data": str(data),
        "out": str(out),
        "max_steps": 6,
        "batch_size": 4,
        "log_every": 1,
        "eval_every": 1000,
        "save_every": 1000,
        "eval_batches": 4,
        "warmup_steps": 2,
        "lr": 3e-3,
        "dropout": 0.0,
        "progress": False,
        "device": "cpu",
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def run_dtl(
    *args: str, timeout: float = 120, env: dict | None = None, **kw
) -> subprocess.CompletedProcess:
    """`python -m dtl ARGS` in a real subprocess."""
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    return subprocess.run(
        [*DTL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
        env=full_env,
        **kw,
    )


def flags(**settings) -> list[str]:
    """Command-line flags of settings: flags(max_steps=2, progress=False) is
    ["--max-steps", "2", "--no-progress"] (True: the bare flag)."""
    out = []
    for key, value in settings.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name}")
        else:
            out += [f"--{name}", str(value)]
    return out


def model_flags() -> list[str]:
    return flags(**TINY_MODEL)


def train_argv(data, out, *extra: str, **settings) -> list[str]:
    """`dtl train` of the tiny model on the CPU, 2 steps of 2 rows unless `settings` say
    otherwise, then the `extra` flags."""
    base = {
        "data": data,
        "out": out,
        **TINY_MODEL,
        "max_steps": 2,
        "batch_size": 2,
        "device": "cpu",
        "progress": False,
    }
    return ["train", *flags(**{**base, **settings}), *extra]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`, which must
    succeed (PROGRAM ARGS, or -m dtl ARGS for the command line)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=PROJECT_ROOT,
        env={**os.environ, **SUBPROCESS_ENV},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`dtl ARGV` in this process (what the console script runs): (exit code, stdout, stderr)."""
    return run_cli(argv, capsys)


def fails_here(capsys, argv: list[str], *needles: str) -> str:
    """`dtl ARGV` in-process fails as a user should see it: exit code 2 and one error line,
    no traceback, naming each of `needles`; returns stderr."""
    code, _, err = cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("dtl train: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def prepared_rows(source: Path, kind: str, max_length: int, tokenizer_dir: Path, out: Path) -> Path:
    """`source` prepared with the test BPE, 20% of it held out for val."""
    from dtl.data.prepare import prepare

    prepare(
        [source],
        out,
        tokenizer=str(tokenizer_dir),
        kind=kind,
        max_length=max_length,
        val_fraction=0.2,
        seed=0,
        progress=False,
    )
    return out
