"""A run's data and files stay sound under clumsy use: a batch too big for memory is refused
before anything is allocated, a resume on other data is refused, a half-written metrics line
survives neither resume nor plot, temporaries of killed runs are removed, a run resumes from
an older checkpoint, and a full disk is one line."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys

import pytest
from train_helpers import cli, fails_here, tiny_config, train_argv

from dtl.data.prepare import prepare
from dtl.run_dir import latest_checkpoint
from dtl.train import memory, train

# ---------------------------------------------------------------------- the memory plan


def _gib_in(line: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"([\d,]+\.\d) GiB", line)]


def test_a_batch_too_big_for_memory_is_refused_before_allocating(
    packed_data, tmp_path, capsys, monkeypatch
):
    # A machine with 4 GiB free (the old code has no such hook: it would allocate instead).
    monkeypatch.setattr(memory, "available_memory", lambda device: 4 * 2**30)
    run = tmp_path / "run"
    err = fails_here(
        capsys,
        train_argv(packed_data, run, batch_size=100_000_000),
        "not enough memory",
        "--batch-size 100000000",
        "--seq-len 32",
        "--grad-accum",
        "--no-memory-check",
    )
    need, available = _gib_in(err.strip().splitlines()[-1])
    # The input and target ids alone are 100M rows x 32 tokens x 2 x int64.
    assert need >= 100_000_000 * 32 * 2 * 8 / 2**30
    assert available == 4.0
    assert not (run / "checkpoints").exists()


def test_no_memory_check_tries_anyway_and_is_not_inherited_by_resume(
    packed_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1024)  # nothing fits
    run = tmp_path / "run"
    fails_here(capsys, train_argv(packed_data, run), "not enough memory")
    code, _, err = cli(train_argv(packed_data, run, "--no-memory-check"), capsys)
    assert code == 0, err
    # The override held for that launch only: a resume checks again.
    fails_here(capsys, ["train", "--resume", run, "--max-steps", "3"], "not enough memory")


def test_available_memory_is_meminfo_capped_by_the_cgroup(tmp_path):
    import torch

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16000000 kB\nMemFree:  100 kB\nMemAvailable:  8000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    cpu = torch.device("cpu")
    assert memory.available_memory(cpu, str(meminfo), str(cgroup)) == 8_000_000 * 1024
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert memory.available_memory(cpu, str(meminfo), str(cgroup)) == 8_000_000 * 1024
    (cgroup / "memory.max").write_text(f"{3 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{2**30}\n")
    assert memory.available_memory(cpu, str(meminfo), str(cgroup)) == 2 * 2**30


# ---------------------------------------------------------------------- resume on other data


def _documents(corpus, n_bytes=80_000) -> list[str]:
    """The corpus's first WikiText articles (` = Title = ` lines start one)."""
    text = corpus.read_text(encoding="utf-8")[:n_bytes]
    return [p for p in re.split(r"(?m)^(?= = [^=])", text) if p.strip()]


def _prepare(text_file, out, tokenizer_dir):
    prepare([text_file], out, tokenizer=str(tokenizer_dir), kind="wikitext", max_length=32,
            val_fraction=0.2, seed=0, progress=False)  # fmt: skip
    return json.loads((out / "meta.json").read_text())


def test_resume_on_reprepared_data_in_another_order_is_refused(
    corpus, tokenizer_dir, tmp_path, capsys
):
    docs = _documents(corpus)
    text = tmp_path / "corpus.raw"
    text.write_text("".join(docs), encoding="utf-8")
    data, run = tmp_path / "data", tmp_path / "run"
    rows = _prepare(text, data, tokenizer_dir)["train"]["rows"]
    code, _, err = cli(train_argv(data, run, max_steps=2), capsys)
    assert code == 0, err
    # The same text prepared again: the same tokens, so the run resumes.
    _prepare(text, data, tokenizer_dir)
    code, _, err = cli(["train", "--resume", run, "--max-steps", "3"], capsys)
    assert code == 0, err
    # The same text in another document order with as many rows (all the old code compared):
    # the first rotation of the articles that keeps the row count.
    for k in range(1, len(docs)):
        text.write_text("".join(docs[k:] + docs[:k]), encoding="utf-8")
        if _prepare(text, data, tokenizer_dir)["train"]["rows"] == rows:
            break
    else:
        pytest.fail("no order of the articles keeps the row count")
    fails_here(capsys, ["train", "--resume", run, "--max-steps", "4"],
               "has changed since step-3", "--no-data-check")  # fmt: skip
    assert latest_checkpoint(run).name == "step-3"  # refused: nothing trained or saved
    # Asked for explicitly, it continues on the new data (and records it from now on).
    code, out, err = cli(["train", "--resume", run, "--max-steps", "4", "--no-data-check"], capsys)
    assert code == 0, err
    assert "continuing on the new data" in out
    code, _, err = cli(["train", "--resume", run, "--max-steps", "5"], capsys)
    assert code == 0, err


# ---------------------------------------------------------------------- metrics.jsonl


def test_a_half_written_metrics_line_is_dropped_on_resume(packed_data, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(train_argv(packed_data, run, max_steps=4, log_every=1), capsys)
    assert code == 0, err
    with open(run / "metrics.jsonl", "a") as f:  # a kill in the middle of a write
        f.write('{"step": 41, "loss": 6.7')
    code, _, err = cli(["train", "--resume", run, "--max-steps", "6"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    code, _, err = cli(["plot", run], capsys)
    assert code == 0 and "warning" not in err, err


def test_plot_skips_a_half_written_last_line_with_a_warning(packed_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(packed_data, run, max_steps=4, eval_every=2))
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 41, "loss": 6.7')
    code, out, err = cli(["plot", run], capsys)
    assert code == 0, err
    assert "skipped a half-written last line" in err and (run / "loss.png").is_file()
    # A damaged line in the middle is not a kill's doing: still refused.
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:-1]]) + "\n")
    code, _, err = cli(["plot", run], capsys)
    assert code == 2 and "metrics.jsonl:2: not a JSON line" in err, err


# ---------------------------------------------------------------------- stale temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_temporaries_of_killed_runs_are_removed_on_resume(packed_data, tmp_path, capsys, live_pid):
    run = tmp_path / "run"
    code, _, err = cli(train_argv(packed_data, run), capsys)
    assert code == 0, err
    ckpts, dead = run / "checkpoints", _dead_pid()
    stale = [
        ckpts / f".tmp-step-9-{dead}",
        ckpts / f".old-step-2-{dead}",
        run / f".data.partial-{dead}",
    ]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 1000)
    (ckpts / f".latest.txt.{dead}").write_text("step-9\n")
    stale.append(run / f".metrics.jsonl.{dead}.k2j4x9.tmp")  # an atomic write's temporary
    stale[-1].write_text("{}\n")
    busy = ckpts / f".tmp-step-7-{live_pid}"  # another process still writing: left alone
    busy.mkdir()
    code, _, err = cli(["train", "--resume", run, "--max-steps", "3"], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in [*stale, ckpts / f".latest.txt.{dead}"])
    assert busy.is_dir()
    assert f".tmp-step-9-{dead}" in err  # said, not silent


def test_a_prepare_removes_what_a_killed_prepare_of_that_dir_left(
    corpus, tokenizer_dir, tmp_path, live_pid
):
    dead = _dead_pid()
    stale = tmp_path / f".wiki.partial-{dead}"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 1000)
    busy = tmp_path / f".wiki.partial-{live_pid}"
    busy.mkdir()
    other = tmp_path / f".other.partial-{dead}"  # another dir's: not this prepare's business
    other.mkdir()
    _prepare(corpus, tmp_path / "wiki", tokenizer_dir)
    assert not stale.exists() and busy.is_dir() and other.is_dir()


# ---------------------------------------------------------------------- an older checkpoint


def _losses(run):
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_resume_from_an_older_checkpoint(packed_data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = train_argv(packed_data, run, max_steps=6, save_every=2, keep_last=5, log_every=1)
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    first = _losses(run)
    code, out, err = cli(["train", "--resume", run / "checkpoints" / "step-2"], capsys)
    assert code == 0, err
    assert "from step-2" in out and "moved to" in out
    # Exact resume: the same losses as the uninterrupted run, from step 3 on.
    assert _losses(run) == first
    ckpts = run / "checkpoints"
    (aside,) = ckpts.glob("superseded-from-step-2-*")
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step-4", "step-6"]
    moved = [json.loads(x) for x in (aside / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in moved if "loss" in r] == [3, 4, 5, 6]
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-2", "step-4", "step-6"]
    assert latest_checkpoint(run).name == "step-6"


def test_a_corrupt_newest_state_says_how_to_resume_from_an_older_one(packed_data, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(train_argv(packed_data, run, max_steps=4, save_every=2), capsys)
    assert code == 0, err
    (run / "checkpoints" / "step-4" / "training_state.pt").write_bytes(b"garbage")
    fails_here(capsys, ["train", "--resume", run], f"--resume {run / 'checkpoints'}/step-N")
    code, _, err = cli(["train", "--resume", run / "checkpoints" / "step-2"], capsys)
    assert code == 0, err


# ---------------------------------------------------------------------- a full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_step(
    packed_data, tmp_path, capsys, monkeypatch
):
    from dtl.model.transformer import TransformerLM

    run = tmp_path / "run"
    monkeypatch.setattr(TransformerLM, "save_pretrained", _no_space)
    fails_here(capsys, train_argv(packed_data, run),
               f"no space left on device writing {run / 'checkpoints' / 'step-2'}",
               "choose another --out")  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []


def test_torch_save_on_a_full_disk_is_recognised():
    """torch.save to a Python file says "unexpected pos"; the ENOSPC behind it is its context."""
    import torch

    from dtl.fileio import is_disk_full

    class FullFile:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    with pytest.raises(Exception) as caught:
        torch.save({"w": torch.zeros(1000)}, FullFile())
    assert is_disk_full(caught.value)
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


@pytest.mark.parametrize("free_kb", [300, 100])
def test_a_real_full_disk_under_a_run(tiny_disk, packed_data, capsys, free_kb):
    """300 kB left: the weights fit, the training state does not (torch's "unexpected pos");
    100 kB: the weights do not (safetensors' "os error 28")."""
    (tiny_disk / "fill").write_bytes(b"\0" * (2048 - free_kb) * 1024)
    run = tiny_disk / "run"
    fails_here(capsys, train_argv(packed_data, run),
               f"no space left on device writing {run / 'checkpoints' / 'step-2'}")  # fmt: skip
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []
