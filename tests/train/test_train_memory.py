"""`dtl info`'s memory estimate against the peak of real `dtl train` runs (CPU RSS)."""

from __future__ import annotations

import json
import sys

import pytest
from train_helpers import run_dtl

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux RSS")


def train_peak_mb(data, out, batch: int) -> float:
    # Freed tensors go straight back to the OS, so RSS follows the live tensors.
    result = run_dtl(
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--batch-size",
        str(batch),
        "--max-steps",
        "3",
        "--log-every",
        "1",
        "--eval-every",
        "1000",
        "--save-every",
        "1000",
        "--no-progress",
        env={"MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(r["peak_mem_mb"] for r in rows if "peak_mem_mb" in r)


def info_estimate_mb(config_json, batch: int, seq: int) -> float:
    result = run_dtl(
        "info",
        "--config",
        str(config_json),
        "--batch-size",
        str(batch),
        "--seq-len",
        str(seq),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["memory"]["train_fp32"]["train_total"] / 2**20


def test_info_estimate_tracks_the_peak_of_real_dtl_train_runs(packed_data, tmp_path):
    """What the batch size adds to a run's peak is what `dtl info` says it adds (the
    process's own baseline, PyTorch and the tokenizer, cancels in the difference)."""
    small_b, large_b = 4, 96
    low = train_peak_mb(packed_data, tmp_path / "b-small", small_b)
    high = train_peak_mb(packed_data, tmp_path / "b-large", large_b)
    config = tmp_path / "b-large" / "checkpoints" / "latest" / "config.json"
    seq = json.loads((packed_data / "meta.json").read_text())["max_length"]
    added = info_estimate_mb(config, large_b, seq) - info_estimate_mb(config, small_b, seq)
    measured = high - low
    print(f"estimate adds {added:.1f} MiB, measured {measured:.1f} MiB")
    assert 0.75 * measured <= added <= 1.25 * measured, (added, measured)
