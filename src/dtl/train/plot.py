"""`dtl plot RUN_DIR`: train and val loss over steps, from the run's metrics.jsonl.

>>> plot_run("runs/tiny")  # doctest: +SKIP
PosixPath('runs/tiny/loss.png')
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dtl.errors import DtlError
from dtl.fileio import atomic_write


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DtlError(f"{run_dir}: no metrics.jsonl here; is it a dtl train run dir?")
    train, evals = [], []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):  # cut off by a kill mid-write
                print(f"warning: {path}:{n}: skipped a half-written last line", file=sys.stderr)
                continue
            raise DtlError(f"{path}:{n}: not a JSON line; the file is damaged") from None
        if not isinstance(rec, dict):
            raise DtlError(f"{path}:{n}: not a JSON object; the file is damaged")
        if "val_loss" in rec:
            evals.append(rec)
        elif "loss" in rec:
            train.append(rec)
    return train, evals


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the loss curves as a PNG (default RUN_DIR/loss.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    if not train and not evals:
        raise DtlError(f"{run_dir}/metrics.jsonl has no loss records yet; train a few steps first")
    out = Path(run_dir) / "loss.png" if out is None else Path(out)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:  # savefig picks the format from the name: give it a .png temporary
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return out
