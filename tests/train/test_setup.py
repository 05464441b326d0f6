"""A run's setup (`dtl.train.setup`): which data `dtl train` trains on, and on rows of what
length. RUN_DIR/data is reused only when it was prepared from the same source, tokenizer and
max_length (or on --resume); seq_len is --seq-len, else the data's max_length (a raw file is
prepared at --seq-len, else 256), and the loader yields rows of exactly that; the model keeps
its preset's context; a run resumes from any directory; a micro-batch with nothing scored
still runs the (DDP-wrapped) forward."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from train_helpers import cli, fails_here, tiny_config, train_argv

from dtl import TransformerLM
from dtl.data.loader import BatchLoader
from dtl.errors import DtlError
from dtl.model import IGNORE_INDEX
from dtl.run_dir import latest_checkpoint
from dtl.train import Trainer, build_model_config, train


def _raw(corpus, path, start, size):
    path.write_bytes(corpus.read_bytes()[start : start + size])
    return path


def _train(data, out, tokenizer, *extra):
    return train_argv(data, out, *extra, max_steps=1, eval_batches=1, tokenizer=tokenizer)


def _meta(run):
    return json.loads((run / "data" / "meta.json").read_text())


def test_run_data_is_prepared_again_for_another_source_tokenizer_or_length(
    corpus, tokenizer_dir, tmp_path, capsys
):
    first = _raw(corpus, tmp_path / "first.raw", 0, 60_000)
    second = _raw(corpus, tmp_path / "second.raw", 60_000, 60_000)
    run = tmp_path / "run"
    # A failed first attempt (after its data was prepared) ...
    fails_here(
        capsys,
        [*_train(first, run, tokenizer_dir, "--seq-len", "32"), "--vocab-size", "100"],
        "vocab mismatch",
    )
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
    code, out, err = cli(
        ["train", "--resume", str(run), "--max-steps", "2", "--no-progress"], capsys
    )
    assert code == 0, err
    assert "preparing" not in out
    assert (run / "data" / "meta.json").read_bytes() == before


def test_resume_from_another_directory(packed_data, tmp_path, capsys, monkeypatch):
    import yaml

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(packed_data, work / "wiki")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    base = train_argv("wiki", "run", eval_batches=1)
    code, _, err = cli(base, capsys)
    assert code == 0, err
    saved = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert saved["data"] == str((work / "wiki").resolve())

    # The same data typed relative to the run's directory is not "a different data".
    code, _, err = cli(
        ["train", "--resume", "run", "--data", "wiki", "--max-steps", "3", "--no-progress"], capsys
    )
    assert code == 0, err

    monkeypatch.chdir(elsewhere)
    code, out, err = cli(
        ["train", "--resume", str(work / "run"), "--max-steps", "4", "--no-progress"], capsys
    )
    assert code == 0, err
    assert "done: step 4" in out
    # Another data dir is still refused.
    other = tmp_path / "other"
    shutil.copytree(packed_data, other)
    fails_here(
        capsys,
        ["train", "--resume", str(work / "run"), "--data", str(other)],
        "cannot resume",
        "data",
    )


def test_the_model_keeps_its_presets_context(packed_data, tmp_path):
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
    fails_here(
        capsys,
        _train(raw, run, tokenizer_dir, "--seq-len", "300"),
        "300",
        "256",
        "dtl prepare --max-length N",
        "qa",
    )
    assert not (run / "checkpoints").exists()


def test_too_little_text_names_dtl_prepare_max_length(corpus, tokenizer_dir, tmp_path, capsys):
    raw = _raw(corpus, tmp_path / "small.raw", 0, 800)
    err = fails_here(
        capsys,
        _train(raw, tmp_path / "run", tokenizer_dir, "--seq-len", "200"),
        "dtl prepare --max-length N",
    )
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
    run = tmp_path / "run"
    train(tiny_config(packed_data, run, max_steps=2))
    config = latest_checkpoint(run) / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "max_seq_length": 32}))
    resumed = train(tiny_config(packed_data, run, max_steps=3), resume=True)
    assert resumed["step"] == 3
    assert TransformerLM.from_pretrained(resumed["checkpoint"]).config.max_seq_length == 32


# ---------------------------------------------------------------------- seq_len, resolved once
def _first_log(run):
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_without_seq_len_a_run_trains_on_the_datas_rows(rows_of_64, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(rows_of_64, run, batch_size=3, max_steps=1))
    assert trainer.seq_len == trainer.setup.seq_len == 64
    batch = next(trainer.train_loader)
    assert {k: tuple(v.shape) for k, v in batch.items()} == dict.fromkeys(batch, (3, 64))
    trainer.run()
    assert _first_log(run)["tokens"] == 1 * 3 * 64  # step 1, 3 rows of 64
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["seq_len"] is None and saved["tokens_per_step"] == 192


def test_seq_len_32_trains_on_the_first_32_tokens_of_each_row(rows_of_64, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(rows_of_64, run, batch_size=3, max_steps=1, seq_len=32))
    assert trainer.seq_len == 32
    batch = next(trainer.train_loader)
    assert {k: tuple(v.shape) for k, v in batch.items()} == dict.fromkeys(batch, (3, 32))
    whole = BatchLoader(rows_of_64, "train", 3, seed=0).next_batch()  # the same rows, all 64
    for key in batch:
        assert torch.equal(batch[key], whole[key][:, :32])
    trainer.train_loader = BatchLoader(rows_of_64, "train", 3, seed=0, seq_len=32)
    trainer.run()
    assert _first_log(run)["tokens"] == 1 * 3 * 32


def test_a_raw_file_without_seq_len_is_prepared_into_rows_of_256(
    corpus, tokenizer_dir, tmp_path, capsys
):
    raw = _raw(corpus, tmp_path / "notes.raw", 0, 60_000)
    run = tmp_path / "run"
    code, out, err = cli(_train(raw, run, tokenizer_dir), capsys)  # no --seq-len
    assert code == 0, err
    assert "preparing" in out and _meta(run)["max_length"] == 256
    assert _first_log(run)["tokens"] == 1 * 2 * 256  # step 1, --batch-size 2, rows of 256


def test_seq_len_longer_than_the_datas_rows_is_one_clear_error(packed_data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = train_argv(packed_data, run, "--seq-len", "48")
    fails_here(
        capsys, argv, "--seq-len 48 is longer than the data's rows (32 tokens)", "--max-length 48"
    )
    assert not (run / "checkpoints").exists()


def test_a_run_records_the_context_it_trained_at(rows_of_64, tmp_path):
    """The tiny preset's table is 256 positions; trained at --seq-len 16, the model dir says
    16, which eval, generation and serving then keep to; a resume keeps recording it."""
    run = tmp_path / "run"
    done = train(tiny_config(rows_of_64, run, batch_size=2, max_steps=1, seq_len=16))
    saved = json.loads((latest_checkpoint(run) / "config.json").read_text())
    assert saved["max_seq_length"] == 256 and saved["trained_seq_len"] == 16
    model = TransformerLM.from_pretrained(done["checkpoint"])
    assert model.config.context == 16 and model.config.base_seq_len is None
    resumed = train(tiny_config(rows_of_64, run, batch_size=2, max_steps=2, seq_len=16), resume=True)
    assert TransformerLM.from_pretrained(resumed["checkpoint"]).config.trained_seq_len == 16
