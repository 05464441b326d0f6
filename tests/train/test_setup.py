"""A run's setup (`dtl.train.setup`): which data `dtl train` trains on, and on rows of what
length. RUN_DIR/data is reused only when it was prepared from the same source, tokenizer and
max_length (or on --resume); seq_len is --seq-len, else the data's max_length (a raw file is
prepared at --seq-len, else the preset's context, 256 for tiny), and the loader yields rows of
exactly that; the model keeps its preset's context, raised to hold longer rows (no new
parameter); `dtl prepare` then `dtl train` with their defaults trains; a run resumes from any
directory; a micro-batch with nothing scored still runs the (DDP-wrapped) forward."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import torch
import yaml
from train_helpers import cli, fails_here, tiny_config, train_argv

from dtl import ModelConfig, TransformerLM
from dtl.data.loader import BatchLoader
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


def _n_params(config):
    return sum(p.numel() for p in TransformerLM(config).parameters())


def test_rows_longer_than_the_presets_context_raise_it_without_new_parameters():
    cfg = tiny_config("data", "run")
    raised = build_model_config(cfg, {"vocab_size": 512}, 300)
    assert raised.max_seq_length == 300  # the tiny preset's 256 holds no row of 300
    plain = build_model_config(cfg, {"vocab_size": 512}, 200)
    assert plain.max_seq_length == 256  # shorter rows keep the preset's context
    # Only the context differs: the sinusoidal table is computed, so the weights are the same
    # tensors, shape for shape (the count is the one the 256-token model has).
    assert dataclasses.replace(raised, max_seq_length=256) == plain
    shapes = {k: v.shape for k, v in TransformerLM(raised).state_dict().items()}
    assert shapes == {k: v.shape for k, v in TransformerLM(plain).state_dict().items()}
    assert _n_params(raised) == _n_params(plain)
    # The qa preset's context (1024) holds them as it is.
    qa = tiny_config("data", "run", preset="qa", d_model=32, n_heads=2, n_layers=1, d_ff=64)
    assert build_model_config(qa, {"vocab_size": 512}, 300).max_seq_length == 1024


def test_long_rows_from_the_command_line(corpus, tokenizer_dir, tmp_path, capsys):
    """--seq-len 300 on the tiny preset: the raw file is prepared into rows of 300 and the
    model's context is raised to hold them, which the first log line says."""
    raw = _raw(corpus, tmp_path / "long.raw", 0, 60_000)
    run = tmp_path / "run"
    code, out, err = cli(_train(raw, run, tokenizer_dir, "--seq-len", "300"), capsys)
    assert code == 0, err
    first = next(line for line in out.splitlines() if line.startswith("training "))
    assert "context 300 tokens (the tiny preset's 256 raised to hold rows of 300" in first
    assert "no new parameters" in first
    saved = json.loads((latest_checkpoint(run) / "config.json").read_text())
    assert (saved["max_seq_length"], saved["trained_seq_len"]) == (300, 300)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["max_seq_length"] == 300


def test_prepare_then_train_with_their_defaults(corpus, tokenizer_dir, tmp_path, capsys):
    """The first hour: `dtl prepare notes.txt -o d`, then `dtl train --data d`, each with its
    defaults (no --max-length, --seq-len or --preset), trains: the rows are the default
    preset's context, and the run trains on them whole."""
    notes = _raw(corpus, tmp_path / "notes.txt", 0, 60_000)
    data = tmp_path / "d"
    code, out, err = cli(["prepare", notes, "-o", data, "--tokenizer", tokenizer_dir], capsys)
    assert code == 0, err
    assert json.loads((data / "meta.json").read_text())["max_length"] == 256  # tiny's context
    run = tmp_path / "run"
    small = ["--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--d-ff", "64"]
    argv = ["train", "--data", data, "--out", run, "--max-steps", "1", "--batch-size", "1",
            "--eval-batches", "1", "--no-progress", *small]  # fmt: skip
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    assert "done: step 1" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["preset"] == "tiny" and saved["tokens_per_step"] == 256
    assert saved["model"]["max_seq_length"] == 256 and "raised" not in out
    # `dtl info` describes the same default model (the tiny preset, its 256-token context).
    code, out, err = cli(["info", "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["model"] == "tiny" and info["config"]["max_seq_length"] == 256


def test_data_prepared_longer_than_the_preset_trains_at_its_length(
    corpus, tokenizer_dir, tmp_path, capsys
):
    """`dtl prepare --max-length 512` (the old default) then `dtl train --data d`: the run
    trains on the rows of 512 with the tiny preset's context raised to 512, the same
    parameters as at 256; a --seq-len longer than the data's rows is still refused."""
    notes = _raw(corpus, tmp_path / "notes.txt", 0, 120_000)
    data = tmp_path / "d"
    code, _, err = cli(
        ["prepare", notes, "-o", data, "--tokenizer", tokenizer_dir, "--max-length", "512"],
        capsys,
    )
    assert code == 0, err
    run = tmp_path / "run"
    argv = ["train", "--data", data, "--out", run, "--max-steps", "1", "--batch-size", "1",
            "--eval-batches", "1", "--no-progress", "--n-layers", "1"]  # fmt: skip
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    first = next(line for line in out.splitlines() if line.startswith("training "))
    n_params = _n_params(ModelConfig.preset("tiny", vocab_size=512, n_layers=1))  # at 256
    assert first.startswith(
        f"training {n_params:,} parameters on cpu (fp32, auto: DTL_CPU_BF16=0), context 512 tokens"
    )
    assert "the tiny preset's 256 raised to hold rows of 512" in first
    saved = json.loads((latest_checkpoint(run) / "config.json").read_text())
    assert (saved["max_seq_length"], saved["trained_seq_len"]) == (512, 512)
    assert _first_log(run)["tokens"] == 512
    # Resuming rebuilds the same raised model and goes on.
    code, out, err = cli(["train", "--resume", run, "--max-steps", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert "done: step 2" in out
    fails_here(
        capsys,
        [*argv[:4], tmp_path / "run2", *argv[5:], "--seq-len", "600"],
        "--seq-len 600 is longer than the data's rows (512 tokens)",
    )


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
    resumed = train(
        tiny_config(rows_of_64, run, batch_size=2, max_steps=2, seq_len=16), resume=True
    )
    assert TransformerLM.from_pretrained(resumed["checkpoint"]).config.trained_seq_len == 16


def test_auto_optimizer_and_data_order_follow_the_planned_passes(packed_data, tmp_path):
    """`--optimizer auto` / `--data-order auto` read one rule (`repeats_data`): planned tokens
    (max_steps x batch x seq_len) against one epoch of the train split's rows; a resume keeps
    the data order its loader saved."""
    from dtl.train.setup import setup_run

    rows = len(BatchLoader(packed_data, "train", 4).dataset)  # rows of 32 tokens
    epoch_steps = rows // 4  # batch 4: one pass
    once = setup_run(
        tiny_config(packed_data, tmp_path / "a", optimizer="auto", max_steps=epoch_steps)
    ).run
    twice = setup_run(
        tiny_config(packed_data, tmp_path / "b", optimizer="auto", max_steps=epoch_steps + 1)
    ).run
    assert (once.repeats, once.optimizer, once.data_order) == (False, "muon", "rows")
    assert (twice.repeats, twice.optimizer, twice.data_order) == (True, "muon", "offsets")
    assert once.passes == 1.0 and twice.passes == (epoch_steps + 1) / epoch_steps
    # Muon's embedding and head lrs: 10x and 3x the lr (3e-3) on data read once, 1x repeated.
    assert "embedding lr 0.03, head lr 0.009," in once.first_line(1000)
    assert "embedding lr 0.003, head lr 0.003," in twice.first_line(1000)
    line = twice.first_line(1000)
    assert line.endswith(
        f"; data read {twice.passes:.2g}x: muon (auto), random row offsets after the first "
        "pass (auto)"
    ), line
    assert once.first_line(1000).endswith("; data read once: muon (auto), the data's rows (auto)")
    named = setup_run(
        tiny_config(packed_data, tmp_path / "c", data_order="rows", max_steps=10 * epoch_steps)
    ).run
    assert named.data_order == "rows"  # as given, not auto
    plain = setup_run(tiny_config(packed_data, tmp_path / "e", optimizer="auto", decay_all=True))
    assert plain.run.optimizer == "adamw"  # --decay-all is AdamW's recipe
    # The trainer's loader cuts what the run decided.
    assert Trainer(
        setup=setup_run(tiny_config(packed_data, tmp_path / "d", max_steps=10 * epoch_steps))
    ).train_loader.offsets
