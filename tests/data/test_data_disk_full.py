"""A full disk under `dtl prepare`, `dtl extract` and `dtl tokenizer train` is one line naming
what was being written, and leaves nothing half-written under the real name or beside it.

The first tests simulate ENOSPC where the bytes go; the last fills a real 2 MB tmpfs (it needs
the right to mount one, as root has)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from data_helpers import run_cli

import dtl.data.extract as extract_module
import dtl.data.shards as shards_module


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _one_line(code: int, err: str, verb: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"dtl {verb}: error: no space left on device writing "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[-1], err
    return lines[-1]


def test_prepare_on_a_full_disk(wikitext_path, gpt2_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DTL_GPT2_DIR", str(gpt2_dir))
    original = shards_module.ShardWriter.extend
    written = []

    def extend(self, ids, mask):  # the disk fills after the first example's tokens
        if written:
            _enospc()
        written.append(len(ids))
        original(self, ids, mask)

    monkeypatch.setattr(shards_module.ShardWriter, "extend", extend)
    out = tmp_path / "data"
    code, _, err = run_cli(["prepare", wikitext_path, "-o", out], capsys)
    _one_line(code, err, "prepare", str(out), "choose another -o")
    assert sorted(os.listdir(tmp_path)) == []  # no data dir, no .data.partial-PID


def test_extract_on_a_full_disk(wikitext_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(extract_module, "_write_jsonl", _enospc)
    out = tmp_path / "records.jsonl"
    code, _, err = run_cli(["extract", wikitext_path, "-o", out], capsys)
    _one_line(code, err, "extract", str(out), "choose another -o")
    assert sorted(os.listdir(tmp_path)) == []


def test_tokenizer_train_on_a_full_disk(wikitext_path, tmp_path, capsys, monkeypatch):
    write_text = Path.write_text

    def full(self, *args, **kwargs):  # every text file written under tmp_path hits a full disk
        if str(self).startswith(str(tmp_path)):
            _enospc()
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "tok"
    code, _, err = run_cli(
        ["tokenizer", "train", wikitext_path, "--vocab-size", "300", "-o", out], capsys
    )
    _one_line(code, err, "tokenizer", str(out))


def test_a_real_full_disk(tiny_disk, wikitext_path, gpt2_dir, capsys, monkeypatch):
    monkeypatch.setenv("DTL_GPT2_DIR", str(gpt2_dir))
    (tiny_disk / "fill").write_bytes(b"\0" * (2048 - 100) * 1024)  # 100 kB left
    for verb, argv in [
        ("prepare", ["prepare", wikitext_path, "-o", tiny_disk / "data"]),
        ("extract", ["extract", wikitext_path, "-o", tiny_disk / "x.jsonl"]),
    ]:
        code, _, err = run_cli(argv, capsys)
        _one_line(code, err, verb, str(tiny_disk))
        assert os.listdir(tiny_disk) == ["fill"], os.listdir(tiny_disk)
