"""Settings (`dtl.train.config`): TrainConfig from a dict, defaults < the saved run config
(--resume) < a --config file < flags, the settings a resume may not change, and the defaults
resolved once: seq_len from the data (a raw file is prepared at the model's context), then the
lr schedule from the model's width."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from train_helpers import cli, fails_here, train_argv

from dtl.errors import DtlError
from dtl.model.config import ModelConfig
from dtl.train.config import (
    MODEL_FIELDS,
    RESUME_LOCKED,
    LrSchedule,
    TrainConfig,
    build_config,
    prepare_length,
    resolve_lr_schedule,
    resolve_seq_len,
)
from dtl.train.setup import build_model_config


def test_the_model_fields_are_model_configs_own():
    # the context is the preset's; what the model trained at is recorded, never a flag
    not_flags = ("max_seq_length", "trained_seq_len", "base_seq_len")
    sizes = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in not_flags]
    assert (
        list(MODEL_FIELDS)
        == sizes
        == ["vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "dropout"]
    )
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert all(defaults[name] is None for name in MODEL_FIELDS)  # None: the preset's
    assert set(MODEL_FIELDS) <= set(RESUME_LOCKED)


def test_from_dict_takes_dashes_and_strings():
    cfg = TrainConfig.from_dict(
        {
            "data": "d",
            "batch-size": "3",
            "decay_all": "yes",
            "lr": "3e-4",
            "max_steps": 2.0,
            "min-lr": None,
        }
    )
    assert (cfg.batch_size, cfg.decay_all, cfg.lr, cfg.max_steps, cfg.min_lr) == (
        3,
        True,
        3e-4,
        2,
        None,
    )
    with pytest.raises(DtlError, match=r"c\.yaml: batch_size must be int, got '2\.5'"):
        TrainConfig.from_dict({"batch_size": "2.5"}, source="c.yaml")
    with pytest.raises(DtlError, match=r"c\.yaml: unknown setting\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning-rate": 1e-3}, source="c.yaml")


def _saved_run(tmp_path, **settings):
    """A run dir whose config.yaml holds `settings` (plus what the run resolved)."""
    run = tmp_path / "run"
    run.mkdir()
    saved = {
        **dataclasses.asdict(TrainConfig(**settings)),
        "model": {"d_model": 32},
        "precision_resolved": "fp32",
        "tokens_per_step": 64,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    return run


def test_defaults_then_saved_run_then_config_file_then_flags(tmp_path):
    run = _saved_run(
        tmp_path, data="/data/wiki", out="elsewhere", lr=1e-3, max_steps=100, warmup_steps=7
    )
    (tmp_path / "c.yaml").write_text("max-steps: 300\nwarmup_steps: 9\n")
    cfg = build_config({"warmup_steps": 11}, config_file=str(tmp_path / "c.yaml"), resume=str(run))
    assert cfg.eval_every == 200  # TrainConfig's default
    assert cfg.lr == 1e-3  # the saved run's
    assert cfg.max_steps == 300  # the file's, over the saved run's
    assert cfg.warmup_steps == 11  # the flag's, over the file's
    assert cfg.out == str(run)  # a resumed run stays in its run dir
    assert build_config({"lr": 2e-3}).lr == 2e-3 and build_config({}).lr is None  # the rule


def test_a_resume_may_not_change_what_fixes_the_model_or_the_data_order(tmp_path, monkeypatch):
    data = tmp_path / "wiki"
    data.mkdir()
    run = _saved_run(tmp_path, data=str(data), batch_size=8)
    with pytest.raises(DtlError, match=r"different batch_size \(batch_size: 8 -> 4\)"):
        build_config({"batch_size": 4}, resume=str(run))
    monkeypatch.chdir(tmp_path)
    assert build_config({"data": "wiki"}, resume=str(run)).data == "wiki"  # the same dir
    assert build_config({"max_steps": 5, "lr": 1.0}, resume=str(run)).max_steps == 5  # free


def test_seq_len_and_min_lr_are_resolved_once():
    cfg = TrainConfig(data="d", lr=1e-3, warmup_steps=7)
    assert resolve_seq_len(cfg, data_max_length=64) == 64
    assert resolve_lr_schedule(cfg, d_model=128) == LrSchedule(
        lr=1e-3, min_lr=1e-4, warmup_steps=7, max_steps=1000, schedule="wsd"
    )
    short = TrainConfig(data="d", seq_len=32, min_lr=0.0, lr=1e-3, warmup_steps=0)
    assert resolve_seq_len(short, data_max_length=64) == 32
    assert resolve_lr_schedule(short, 128) == LrSchedule(1e-3, 0.0, 0, 1000, "wsd")
    assert resolve_seq_len(TrainConfig(data="d", seq_len=64), 64) == 64
    with pytest.raises(DtlError, match=r"--seq-len 65 is longer than the data's rows \(64 tokens"):
        resolve_seq_len(TrainConfig(data="d", seq_len=65), data_max_length=64)
    # A raw --data file is prepared at --seq-len, else at the model's context: the preset's
    # max_seq_length (256 for the default, tiny; 1024 for qa), or an --init-from model's.
    assert prepare_length(TrainConfig(data="notes.txt")) == 256
    assert prepare_length(TrainConfig(data="notes.txt", preset="qa")) == 1024
    assert prepare_length(TrainConfig(data="notes.txt"), context=96) == 96
    assert prepare_length(TrainConfig(data="notes.txt", seq_len=32), context=96) == 32
    with pytest.raises(DtlError, match="--seq-len must be a positive integer, got 0"):
        TrainConfig(data="d", seq_len=0).validate()


def test_bad_settings(packed_data, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("max_steps: 2\nlearning_rate: 1e-3\n")
    fails_here(
        capsys,
        [*train_argv(packed_data, tmp_path / "r"), "--config", str(tmp_path / "c.yaml")],
        "unknown setting(s) ['learning_rate']",
    )
    (tmp_path / "d.yaml").write_text("warmup_steps: lots\n")
    fails_here(
        capsys,
        [*train_argv(packed_data, tmp_path / "r"), "--config", str(tmp_path / "d.yaml")],
        "warmup_steps must be int",
    )
    (tmp_path / "e.yaml").write_text("- a list\n")
    fails_here(
        capsys,
        [*train_argv(packed_data, tmp_path / "r"), "--config", str(tmp_path / "e.yaml")],
        "expected a mapping",
    )
    fails_here(
        capsys, train_argv(packed_data, tmp_path / "r", "--precision", "fp16"), "fp16 needs a GPU"
    )
    fails_here(capsys, train_argv(packed_data, tmp_path / "r", "--batch-size", "0"), "--batch-size")
    fails_here(
        capsys, train_argv(packed_data, tmp_path / "r", "--seq-len", "0"), "--seq-len must be"
    )
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_config_file_then_flags_resolved_and_saved(packed_data, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: 2e-3\nbatch-size: 3\nmax_steps: 2\nschedule: linear\n")
    run = tmp_path / "run"
    code, out, err = cli(
        [*train_argv(packed_data, run), "--config", str(tmp_path / "c.yaml"), "--lr", "1e-3"],
        capsys,
    )
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 1e-3  # the flag wins over the file
    assert saved["batch_size"] == 2  # train_argv's flag wins too
    assert saved["schedule"] == "linear" and saved["model"]["d_model"] == 32
    assert "done: step 2" in out and "val perplexity" in out


def test_lr_and_warmup_defaults_follow_the_width_and_the_run_length():
    """lr = 1e-3 * sqrt(128 / d_model); warmup = 5% of max_steps, 1 to 500 (hand-computed)."""
    narrow = TrainConfig(data="d", d_model=128, max_steps=1562)
    got = resolve_lr_schedule(narrow, d_model=128)
    assert got.lr == pytest.approx(1e-3)
    assert got.min_lr == pytest.approx(1e-4) and got.warmup_steps == 78
    wide = resolve_lr_schedule(TrainConfig(data="d", max_steps=40), d_model=768)
    assert wide.lr == pytest.approx(4.0825e-4, rel=1e-4) and wide.warmup_steps == 2  # /sqrt(6)
    assert resolve_lr_schedule(TrainConfig(data="d", max_steps=1), 128).warmup_steps == 1
    assert resolve_lr_schedule(TrainConfig(data="d", max_steps=10**6), 128).warmup_steps == 500
    # The width is the model's: the preset's own when --d-model is not given (small is 256).
    small = TrainConfig(data="d", preset="small")
    width = build_model_config(small, {"vocab_size": 512}, 64).d_model
    assert resolve_lr_schedule(small, width).lr == pytest.approx(1e-3 / math.sqrt(2))
    # A min-lr above the resolved peak is refused, naming both.
    with pytest.raises(DtlError, match=r"--min-lr 0.01 is above the peak lr 0.001"):
        resolve_lr_schedule(TrainConfig(data="d", min_lr=0.01), d_model=128)
    with pytest.raises(DtlError, match="unknown --optimizer 'sgd'; choose adamw, muon"):
        TrainConfig(data="d", optimizer="sgd").validate()
    with pytest.raises(DtlError, match="--decay-all is AdamW's plain recipe"):
        TrainConfig(data="d", optimizer="muon", decay_all=True).validate()
