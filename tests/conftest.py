"""Fixtures for every test. The shared real data is read through `testkit.shared_path`."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from testkit import run_cli, shared_path

from dtl.tokenizer import load_tokenizer

# DTL's step kernel is built into a folder of this test session's own, not the user's cache
# (`dtl.generate.step_kernel.kernel_dir`); subprocesses the tests start inherit it.
_KERNELS = tempfile.mkdtemp(prefix="dtl-test-kernels-")
os.environ.setdefault("DTL_CACHE_DIR", _KERNELS)
atexit.register(shutil.rmtree, _KERNELS, ignore_errors=True)


@pytest.fixture
def gpt2_dir() -> Path:
    """The official GPT-2 BPE files (encoder.json + vocab.bpe)."""
    return shared_path("gpt2")


@pytest.fixture
def gpt2(gpt2_dir, monkeypatch):
    """GPT-2's tokenizer from the shared files, with DTL_GPT2_DIR set for code that loads it."""
    monkeypatch.setenv("DTL_GPT2_DIR", str(gpt2_dir))
    return load_tokenizer("gpt2", gpt2_dir=gpt2_dir)


@pytest.fixture
def dtl(capsys, gpt2_dir, monkeypatch):
    """Run `dtl ARGS...` in this process; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("DTL_GPT2_DIR", str(gpt2_dir))
    return lambda *args: run_cli(list(args), capsys)


@pytest.fixture(autouse=True)
def _seed_and_one_thread(monkeypatch):
    """Tests use tiny models, which gain nothing from a thread pool; on a busy 2-core box its
    hand-offs make each small op up to 100x slower. Restored afterwards. (OMP_NUM_THREADS:
    the verbs run in-process keep to one thread too; see dtl.threads.)"""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run dir of a tiny model (2 layers, d_model 64, a 512-token BPE) trained 200 steps on
    wikitext-2's test text, and held-out text from the same file beside it
    (`held_out.txt`): a model whose perplexity means something (seconds)."""
    import contextlib
    import io

    from dtl.cli import main

    work = tmp_path_factory.mktemp("trained")
    raw = shared_path("wikitext-2-raw", "wiki.test.raw").read_bytes()
    (work / "train.raw").write_bytes(raw[:150_000])
    (work / "held_out.txt").write_bytes(raw[150_000:165_000])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    for args in (
        ["tokenizer", "train", work / "train.raw", "--vocab-size", 512, "-o", work / "tok"],
        ["prepare", work / "train.raw", "--kind", "wikitext", "--max-length", 64,
         "--tokenizer", work / "tok", "-o", work / "data"],
        ["train", "--data", work / "data", "--out", work / "run", "--seq-len", 64, "--preset",
         "tiny", "--d-model", 64, "--n-heads", 2, "--n-layers", 2, "--d-ff", 128, "--lr", 3e-3,
         "--max-steps", 200, "--batch-size", 8, "--device", "cpu", "--no-progress",
         "--threads", 1, "--eval-batches", 2],
    ):  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main([str(a) for a in args]) == 0, args
    torch.set_num_threads(before)
    return work / "run"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs to fill (the disk-full tests of data and train; skipped where mounting is
    not allowed: their simulated tests cover the messages there)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the simulated tests cover the messages")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)  # lazily: a file may be open


@pytest.fixture(autouse=True, scope="session")
def _cpu_without_native_bf16():
    """Every test, and every process it starts (module fixtures' runs included: hence the
    session scope), sees a CPU without native bf16 units (`dtl.device.cpu_native_bf16`), so
    `--precision auto` and `--dtype auto` are fp32 and results do not depend on the machine; the bf16 tests ask for bf16 by name or change this
    (tests/train/test_train_precision.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DTL_CPU_BF16", "0")
        yield
