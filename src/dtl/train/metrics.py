"""What a run logs: RUN_DIR/metrics.jsonl (one JSON object per logged step and per
evaluation), TensorBoard with --tensorboard, and the lines printed. Only rank 0 logs.

>>> log = MetricsLog(Path("runs/tiny"), is_main=True)  # doctest: +SKIP
>>> log.write({"step": 10, "loss": 5.12, "lr": 3e-4})   # doctest: +SKIP
>>> log.last_eval()                                     # doctest: +SKIP
{'step': 200, 'val_loss': 4.81, 'val_ppl': 122.7}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dtl.errors import DtlError
from dtl.fileio import atomic_write_text, disk_full_as_error
from dtl.run_dir import METRICS_FILE
from dtl.train.memory import peak_rss_bytes


class MetricsLog:
    """RUN_DIR/metrics.jsonl (and TensorBoard) of one run; a no-op off rank 0."""

    def __init__(self, run_dir: Path, is_main: bool, tensorboard: bool = False) -> None:
        self.path = run_dir / METRICS_FILE
        self.is_main = is_main
        self.writer = _tensorboard_writer(run_dir) if tensorboard and is_main else None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it has a "step"); its numbers go to TensorBoard too."""
        if not self.is_main:
            return
        with disk_full_as_error(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def print(self, text: str) -> None:
        """A line on stdout that does not break the progress bar."""
        if self.is_main:
            tqdm.write(text)
            sys.stdout.flush()

    def start(self) -> None:
        """A new run: no records of an earlier one in this run dir."""
        if self.is_main:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop the records after `step`: a resumed run logs them again from its checkpoint."""
        if not (self.is_main and self.path.is_file()):
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        # A line that is not a JSON object (the half-written last one of a killed run) goes too.
        kept = [line for line in lines if (n := _line_step(line)) is not None and n <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def last_eval(self) -> dict[str, Any] | None:
        """The newest evaluation record, or None when the run has none."""
        last = None
        if self.is_main and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                record = _record(line)
                if record is not None and "val_loss" in record:
                    last = record
        return last

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(run_dir: Path):
    try:  # an optional dependency: imported only when asked for
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DtlError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _record(line: str) -> dict[str, Any] | None:
    """A metrics line as its record, or None when it is not a JSON object (a cut-off line)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _line_step(line: str) -> int | None:
    """The step of a metrics line (0 when it has none), or None when it is not a record."""
    record = _record(line)
    if record is None:
        return None
    try:
        return int(record.get("step", 0))
    except (TypeError, ValueError):
        return 0


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max_memory_allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_bytes() / 2**20
