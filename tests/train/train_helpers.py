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

    settings = {**TINY_MODEL, "data": str(data), "out": str(out), "max_steps": 6,
                "batch_size": 4, "log_every": 1, "eval_every": 1000, "save_every": 1000,
                "eval_batches": 4, "warmup_steps": 2, "lr": 3e-3, "dropout": 0.0,
                "progress": False, "device": "cpu"}
    settings.update(overrides)
    return TrainConfig(**settings)


def run_dtl(*args: str, timeout: float = 120, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m dtl ARGS` in a real subprocess."""
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    return subprocess.run([*DTL, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT, env=full_env, **kw)


def model_flags() -> list[str]:
    flags = []
    for key, value in TINY_MODEL.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`dtl ARGV` in this process (what the console script runs): (exit code, stdout, stderr)."""
    return run_cli(argv, capsys)
