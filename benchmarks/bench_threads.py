"""Threads on a shared machine: `dtl train` and `dtl generate`, free and beside a busy process.

Issue 14: beside one other 2-thread process, DTL ran 7-12x slower, because torch's OpenMP
threads spin while idle and take the cores the working threads need. DTL now makes idle
threads sleep (OMP_WAIT_POLICY=PASSIVE, set before torch loads; see src/dtl/threads.py).

This runs, in one go, each verb as a user does (a fresh `python -m dtl` process) in each of:
  old       the previous behaviour: libgomp's default spin-wait (GOMP_SPINCOUNT=300000, which
            also stops DTL from setting its policy) and torch's default threads (one per core)
  new       DTL's default now (idle threads sleep; a short spin for the decode verbs,
            `dtl.threads.DECODE_VERBS`)
  passive   OMP_WAIT_POLICY=PASSIVE for every verb (the default before the decode verbs'
            short spin), to measure that spin free and busy
  new -t1   `--threads 1`, for reference
on a free machine and beside a competitor: a 2-thread torch matmul loop in its own process,
with torch's default (spinning) OpenMP. `dtl train`: the tiny preset on a 4k BPE, --seq-len
128, --batch-size 16 (the issue's run), tokens/s of the last log window; `dtl generate`: 100
greedy tokens, wall seconds of the whole command. Each figure is the best of --repeats, the
modes taken in turns. Goals: busy `new` at most 2x slower than free `new`; free `new` within
5% of free `old`.

    python benchmarks/bench_threads.py [--repeats 2] [--steps 20]

Needs ../shared/data/wikitext-2-raw/wiki.test.raw (the text it trains on).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared_data import WIKITEXT

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "old": ({"GOMP_SPINCOUNT": "300000"}, []),
    "new": ({}, []),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "new -t1": ({}, ["--threads", "1"]),
}
COMPETITOR = """
import time, torch
a = torch.randn(384, 384)
while True:
    a @ a
"""


def dtl(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout + stderr) of `python -m dtl ARGS` in a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    base["PYTHONPATH"] = str(ROOT / "src")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dtl", *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"dtl {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def setup(work: Path, steps: int) -> None:
    """A 4k BPE, the data prepared at 128 tokens, and a checkpoint to generate from."""
    text = work / "wiki.txt"
    text.write_bytes(WIKITEXT.read_bytes()[:400_000])
    dtl(["tokenizer", "train", str(text), "--vocab-size", "4096", "-o", "tok"], {}, work)
    dtl(train_args(steps, "setup") + ["--tokenizer", "tok"], {}, work)


def train_args(steps: int, out: str) -> list[str]:
    data = "wiki.txt" if out == "setup" else "setup/data"
    return ["train", "--data", data, "--out", out, "--preset", "tiny", "--seq-len", "128",
            "--batch-size", "16", "--max-steps", str(steps), "--log-every", str(steps // 2),
            "--eval-every", "100000", "--save-every", "100000", "--no-progress"]  # fmt: skip


def train_tokens_per_s(mode: str, steps: int, work: Path) -> float:
    env, extra = MODES[mode]
    out = f"run-{mode.replace(' ', '')}"
    _, log = dtl(train_args(steps, out) + extra, env, work)
    rates = re.findall(r"([\d,]+) tokens/s", log)
    subprocess.run(["rm", "-rf", str(work / out)], check=True)
    return float(rates[-1].replace(",", ""))  # the last window: past the warm-up


def generate_seconds(mode: str, work: Path) -> float:
    env, extra = MODES[mode]
    args = ["generate", "--model", "setup", "--prompt", "The history of", "--max-new-tokens",
            "100", "--temperature", "0"]  # fmt: skip
    seconds, _ = dtl(args + extra, env, work)
    return seconds


def measure(repeats: int, steps: int, work: Path) -> dict[str, dict[str, float]]:
    """{"train"/"generate": {mode: best figure}} with the modes in turns."""
    train: dict[str, float] = {}
    gen: dict[str, float] = {}
    for _ in range(repeats):
        for mode in MODES:
            train[mode] = max(train.get(mode, 0.0), train_tokens_per_s(mode, steps, work))
            gen[mode] = min(gen.get(mode, float("inf")), generate_seconds(mode, work))
    return {"train": train, "generate": gen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure (best kept)")
    parser.add_argument("--steps", type=int, default=20, help="dtl train steps per run")
    args = parser.parse_args()
    if not WIKITEXT.is_file():
        raise SystemExit(f"{WIKITEXT}: missing; this benchmark trains on it")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"cores: {len(os.sched_getaffinity(0))}; setting up in {work} ...", flush=True)
        setup(work, 2)
        free = measure(args.repeats, args.steps, work)
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        env = {k: v for k, v in env.items() if not k.startswith(("GOMP_", "OMP_WAIT"))}
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
        try:
            time.sleep(2)  # let it start spinning
            busy = measure(args.repeats, args.steps, work)
        finally:
            competitor.kill()
            competitor.wait()
    report(free, busy)


def report(free: dict, busy: dict) -> None:
    print("\ndtl train, tokens/s (higher is better)")
    print(f"{'mode':10}{'free':>10}{'busy':>10}{'busy slowdown':>16}")
    for mode in MODES:
        f, b = free["train"][mode], busy["train"][mode]
        print(f"{mode:10}{f:10,.0f}{b:10,.0f}{f / b:15.2f}x")
    print("\ndtl generate, 100 tokens, wall seconds (lower is better)")
    print(f"{'mode':10}{'free':>10}{'busy':>10}{'busy slowdown':>16}")
    for mode in MODES:
        f, b = free["generate"][mode], busy["generate"][mode]
        print(f"{mode:10}{f:10.2f}{b:10.2f}{b / f:15.2f}x")
    t_free = free["train"]["new"] / free["train"]["old"]
    g_free = free["generate"]["old"] / free["generate"]["new"]
    t_busy = free["train"]["new"] / busy["train"]["new"]
    g_busy = busy["generate"]["new"] / free["generate"]["new"]
    print("\ngoals")
    print(f"  free machine, new vs old speed: train {t_free:.2f}x, generate {g_free:.2f}x "
          f"(goal >= 0.95x) {'ok' if min(t_free, g_free) >= 0.95 else 'MISSED'}")  # fmt: skip
    print(f"  busy vs free slowdown, new:      train {t_busy:.2f}x, generate {g_busy:.2f}x "
          f"(goal <= 2x) {'ok' if max(t_busy, g_busy) <= 2 else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
