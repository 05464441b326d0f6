"""`dtl export` on the command line: what it writes, and one clear line for each mistake."""

from __future__ import annotations

import json

import pytest
from testkit import run_cli

import dtl.export.hf


def _dtl(capsys, *args):
    return run_cli(list(args), capsys)


def test_export_hf_from_run_dir(capsys, run_dir, tmp_path):
    code, out, err = _dtl(capsys, "export", run_dir, "--format", "hf", "-o", tmp_path / "m")
    assert code == 0, err
    assert "wrote" in out
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "dtl"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left


def test_unknown_format_is_one_line(capsys, bpe_model_dir, tmp_path):
    code, _, err = _dtl(capsys, "export", bpe_model_dir, "--format", "gguf", "-o", tmp_path / "m")
    assert code == 2
    assert err.strip() == "dtl export: error: --format gguf: unknown; choose one of hf, onnx"
    assert not (tmp_path / "m").exists()


def test_missing_model_is_one_line(capsys, tmp_path):
    code, _, err = _dtl(capsys, "export", tmp_path / "nope", "--format", "hf", "-o", tmp_path / "m")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "no such model" in err
    assert not (tmp_path / "m").exists()


def test_non_empty_target_refused_unless_force(capsys, bpe_model_dir, tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code, _, err = _dtl(capsys, "export", bpe_model_dir, "--format", "hf", "-o", target)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "not empty" in err and "--force" in err
    assert [p.name for p in target.iterdir()] == ["notes.txt"]  # untouched
    code, _, err = _dtl(capsys, "export", bpe_model_dir, "--format", "hf", "-o", target, "--force")
    assert code == 0, err
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").is_file()


def test_empty_target_is_used(capsys, bpe_model_dir, tmp_path):
    (tmp_path / "m").mkdir()
    code, _, err = _dtl(capsys, "export", bpe_model_dir, "--format", "onnx", "-o", tmp_path / "m")
    assert code == 0, err
    assert (tmp_path / "m" / "model.onnx").is_file()


def test_failure_leaves_no_half_written_export(capsys, bpe_model_dir, tmp_path, monkeypatch):
    """A failure midway (here: writing the tokenizer) leaves neither the target nor a
    temporary folder; an earlier export under --force stays as it was."""

    def broken(*args, **kwargs):
        raise OSError("disk full")

    target = tmp_path / "m"
    target.mkdir()
    (target / "old.txt").write_text("earlier export")
    monkeypatch.setattr(dtl.export.hf, "write_hf_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        _dtl(capsys, "export", bpe_model_dir, "--format", "hf", "-o", target, "--force")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_tokenizer_without_files_is_one_line(capsys, bpe_model_dir, tmp_path, monkeypatch):
    """GPT-2 read from tiktoken's cache has no vocabulary files to write out: say what to do."""
    import dtl.tokenizer as tokenizer_module

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_bytes((bpe_model_dir / name).read_bytes())
    real = tokenizer_module.load_tokenizer(bpe_model_dir)
    cacheless = tokenizer_module.Tokenizer(real.name, real.vocab_size, real.eos_id, {},
                                           _hf=real._hf)  # fmt: skip
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", lambda *a, **k: cacheless)
    code, _, err = _dtl(capsys, "export", model_dir, "--format", "hf", "-o", tmp_path / "m",
                        "--tokenizer", bpe_model_dir)  # fmt: skip
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "vocabulary files" in err
    assert not (tmp_path / "m").exists()


def test_help_lists_export(capsys):
    with pytest.raises(SystemExit):
        _dtl(capsys, "export", "--help")
    assert "--format" in capsys.readouterr().out
