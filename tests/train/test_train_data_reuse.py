"""Which data `dtl train` trains on: RUN_DIR/data is reused only when it was prepared from
the same source, tokenizer and max_length (or on --resume); the model keeps its preset's
context; a run resumes from any directory; a micro-batch with nothing scored still runs
the (DDP-wrapped) forward."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from train_helpers import cli, model_flags, tiny_config

from dtl import TransformerLM
from dtl.errors import DtlError
from dtl.model import IGNORE_INDEX
from dtl.run_dir import latest_checkpoint
from dtl.train import Trainer, build_model_config


def _raw(corpus, path, start, size):
    path.write_bytes(corpus.read_bytes()[start:start + size])
    return path


def _train(data, out, tokenizer, *extra):
    return ["train", "--data", str(data), "--out", str(out), *model_flags(), "--max-steps", "1",
            "--batch-size", "2", "--eval-batches", "1", "--device", "cpu", "--no-progress",
            "--tokenizer", str(tokenizer), *extra]


def _meta(run):
    return json.loads((run / "data" / "meta.json").read_text())


def _fails_here(capsys, argv, *needles):
    code, _, err = cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("dtl train: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_run_data_is_prepared_again_for_another_source_tokenizer_or_length(
        corpus, tokenizer_dir, tmp_path, capsys):
    first = _raw(corpus, tmp_path / "first.raw", 0, 60_000)
    second = _raw(corpus, tmp_path / "second.raw", 60_000, 60_000)
    run = tmp_path / "run"
    # A failed first attempt (after its data was prepared) ...
    _fails_here(capsys, [*_train(first, run, tokenizer_dir, "--seq-len", "32"), "--vocab-size",
                         "100"], "vocab mismatch")
    assert _meta(run)["sources"][0]["path"] == str(first)
    # ... does not pin the run to that file: another --data is prepared again.
    code, out, err = cli(_train(second, run, tokenizer_dir, "--seq-len", "32"), capsys)
    assert code == 0, err
    assert "preparing" in out
    meta = _meta(run)
    assert meta["sources"][0]["path"] == str(second) and meta["max_length"] == 32

    # The same file, tokenizer and length: reused, not prepared again.
    shutil.rmtree(run / "checkpoints")
    code, out, err = cli(_train(second, run, tokenizer_dir, "--seq-len", "32"), capsys)
    assert code == 0, err
    assert "preparing" not in out

    # Another --seq-len (the prepared max_length): prepared again.
    shutil.rmtree(run / "checkpoints")
    code, out, err = cli(_train(second, run, tokenizer_dir, "--seq-len", "24"), capsys)
    assert code == 0, err
    assert "preparing" in out and _meta(run)["max_length"] == 24

    # The same file edited in place (same name, other bytes): prepared again.
    shutil.rmtree(run / "checkpoints")
    _raw(corpus, second, 120_000, 60_000)
    code, out, err = cli(_train(second, run, tokenizer_dir, "--seq-len", "24"), capsys)
    assert code == 0, err
    assert "preparing" in out

    # Another tokenizer: prepared again (gpt2 is not available offline, so another BPE dir).
    other_tok = tmp_path / "tok2"
    shutil.copytree(tokenizer_dir, other_tok)
    shutil.rmtree(run / "checkpoints")
    code, out, err = cli(_train(second, run, other_tok, "--seq-len", "24"), capsys)
    assert code == 0, err
    assert "preparing" in out and _meta(run)["tokenizer"] == str(other_tok)

    # --resume keeps the run's prepared data, whatever the source file holds now.
    before = (run / "data" / "meta.json").read_bytes()
    _raw(corpus, second, 0, 60_000)
    code, out, err = cli(["train", "--resume", str(run), "--max-steps", "2", "--no-progress"],
                         capsys)
    assert code == 0, err
    assert "preparing" not in out
    assert (run / "data" / "meta.json").read_bytes() == before


def test_resume_from_another_directory(packed_data, tmp_path, capsys, monkeypatch):
    import yaml

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(packed_data, work / "wiki")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    base = ["train", "--data", "wiki", "--out", "run", *model_flags(), "--max-steps", "2",
            "--batch-size", "2", "--eval-batches", "1", "--device", "cpu", "--no-progress"]
    code, _, err = cli(base, capsys)
    assert code == 0, err
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["data"] == str((work / "wiki").resolve())

    # The same data typed relative to the run's directory is not "a different data".
    code, _, err = cli(["train", "--resume", "run", "--data", "wiki", "--max-steps", "3",
                        "--no-progress"], capsys)
    assert code == 0, err

    monkeypatch.chdir(elsewhere)
    code, out, err = cli(["train", "--resume", str(work / "run"), "--max-steps", "4",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "done: step 4" in out
    # Another data dir is still refused.
    other = tmp_path / "other"
    shutil.copytree(packed_data, other)
    _fails_here(capsys, ["train", "--resume", str(work / "run"), "--data", str(other)],
                "cannot resume", "data")


def test_the_model_keeps_its_presets_context(packed_data, tmp_path):
    from dtl.train import train

    summary = train(tiny_config(packed_data, tmp_path / "run", max_steps=2))
    model = TransformerLM.from_pretrained(summary["checkpoint"])
    assert model.config.max_seq_length == 256  # the tiny preset's, not the data's 32
    # Resuming the run keeps it and trains on.
    resumed = train(tiny_config(packed_data, tmp_path / "run", max_steps=3), resume=True)
    assert resumed["step"] == 3
    assert TransformerLM.from_pretrained(resumed["checkpoint"]).config.max_seq_length == 256


def test_rows_longer_than_the_context_name_both_numbers():
    cfg = tiny_config("data", "run")
    with pytest.raises(DtlError) as err:
        build_model_config(cfg, {"vocab_size": 512}, 300)
    text = str(err.value)
    assert "300" in text and "256" in text and "dtl prepare --max-length N" in text
    assert "qa" in text
    # The qa preset's context (1024) holds them.
    qa = tiny_config("data", "run", preset="qa", d_model=32, n_heads=2, n_layers=1, d_ff=64)
    assert build_model_config(qa, {"vocab_size": 512}, 300).max_seq_length == 1024


def test_long_rows_from_the_command_line(corpus, tokenizer_dir, tmp_path, capsys):
    raw = _raw(corpus, tmp_path / "long.raw", 0, 60_000)
    run = tmp_path / "run"
    _fails_here(capsys, _train(raw, run, tokenizer_dir, "--seq-len", "300"), "300", "256",
                "dtl prepare --max-length N", "qa")
    assert not (run / "checkpoints").exists()


def test_too_little_text_names_dtl_prepare_max_length(corpus, tokenizer_dir, tmp_path, capsys):
    raw = _raw(corpus, tmp_path / "small.raw", 0, 800)
    err = _fails_here(capsys, _train(raw, tmp_path / "run", tokenizer_dir, "--seq-len", "200"),
                      "dtl prepare --max-length N")
    assert "a smaller --max-length" not in err


def test_a_micro_batch_with_nothing_scored_still_runs_the_forward(packed_data, tmp_path):
    trainer = Trainer(tiny_config(packed_data, tmp_path / "run", grad_accum=2))
    calls = []
    forward = trainer.forward

    def counting(*args, **kwargs):
        calls.append(args[1])
        return forward(*args, **kwargs)

    trainer.forward = counting
    batches = iter(trainer.train_loader)
    scored, empty = next(batches), next(batches)
    empty = {**empty, "targets": torch.full_like(empty["targets"], IGNORE_INDEX)}
    loss, grad_norm, _ = trainer.train_step([scored, empty])
    assert len(calls) == 2  # both micro-batches went through the (wrapped) forward
    assert (calls[1] == IGNORE_INDEX).all()
    assert math.isfinite(loss) and math.isfinite(grad_norm)  # the empty one adds 0, not NaN
    assert latest_checkpoint(tmp_path / "run") is None


def test_a_run_saved_with_the_datas_context_still_resumes(packed_data, tmp_path):
    """Runs from before the context rule saved max_seq_length = the data's max_length."""
    from dtl.train import train

    run = tmp_path / "run"
    train(tiny_config(packed_data, run, max_steps=2))
    config = latest_checkpoint(run) / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "max_seq_length": 32}))
    resumed = train(tiny_config(packed_data, run, max_steps=3), resume=True)
    assert resumed["step"] == 3
    assert TransformerLM.from_pretrained(resumed["checkpoint"]).config.max_seq_length == 32
