"""`load_model`: run dirs (latest checkpoint), checkpoint dirs and legacy .pt files."""

from __future__ import annotations

import os

import pytest
import torch

from dtl import DtlError, ModelConfig, TransformerLM
from dtl.model.store import load_model, resolve_model_dir


def small_model(seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=50257, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                         max_seq_length=32)  # fmt: skip
    return TransformerLM(config)


def save_model_dir(directory, seed, tokenizer) -> TransformerLM:
    model = small_model(seed)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return model


def same_weights(a: TransformerLM, b: TransformerLM) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))  # fmt: skip


def test_checkpoint_dir_loads_model_and_tokenizer(tmp_path, gpt2):
    saved = save_model_dir(tmp_path / "m", 1, gpt2)
    model, tokenizer = load_model(tmp_path / "m")
    assert same_weights(model, saved)
    assert not model.training  # eval mode: no dropout in generation
    assert tokenizer.encode("Hello world") == gpt2.encode("Hello world") == [15496, 995]


def test_run_dir_uses_latest_symlink_then_latest_txt_then_highest_step(tmp_path, gpt2):
    ckpts = tmp_path / "run" / "checkpoints"
    models = {n: save_model_dir(ckpts / f"step-{n}", n, gpt2) for n in (2, 10, 7)}
    # no pointer at all: the highest step number (10, not the lexically last "step-7")
    model, _ = load_model(tmp_path / "run")
    assert same_weights(model, models[10])
    (ckpts / "latest.txt").write_text("step-7\n")
    assert same_weights(load_model(tmp_path / "run")[0], models[7])
    os.symlink("step-2", ckpts / "latest")
    assert same_weights(load_model(tmp_path / "run")[0], models[2])
    assert resolve_model_dir(ckpts) == (ckpts / "step-2").resolve()


def test_legacy_pt_file_loads_with_gpt2_tokenizer(tmp_path, gpt2):
    legacy = small_model(3)
    state = {k: v for k, v in legacy.state_dict().items()}
    torch.save({"model_state_dict": state, "epoch": 4}, tmp_path / "best_model.pt")
    model, tokenizer = load_model(tmp_path / "best_model.pt")
    assert tokenizer.name == "gpt2" and tokenizer.eos_id == 50256
    ids = torch.tensor([[15496, 995]])
    torch.testing.assert_close(model(ids), legacy.eval()(ids))


def test_tokenizer_override_and_mismatch(tmp_path, gpt2):
    torch.manual_seed(0)
    small = TransformerLM(ModelConfig(vocab_size=1000, d_model=16, n_heads=2, n_layers=1,
                                      d_ff=32, max_seq_length=32))  # fmt: skip
    small.save_pretrained(tmp_path / "m")
    with pytest.raises(DtlError, match="cannot load its tokenizer"):
        load_model(tmp_path / "m")  # no tokenizer files saved with it
    with pytest.raises(DtlError, match="50257 tokens but the model"):
        load_model(tmp_path / "m", tokenizer="gpt2")


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(DtlError, match="no such model"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DtlError, match="neither a model dir"):
        load_model(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(DtlError, match="no saved checkpoint"):
        load_model(tmp_path / "run")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DtlError, match="legacy DTL .pt"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DtlError, match="not a loadable PyTorch checkpoint"):
        load_model(tmp_path / "broken.pt")


def test_run_dir_lookup_is_dtl_checkpoint_latest_model_dir(tmp_path, gpt2):
    from dtl.run_dir import latest_checkpoint, latest_model_dir
    from dtl.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (1, 2):  # what dtl train writes: latest, latest.txt, training_state.pt
        save_checkpoint(run, step, small_model(step), {"step": step}, tokenizer=gpt2)
    assert latest_model_dir(run) == latest_model_dir(ckpts) == (ckpts / "step-2").resolve()
    assert resolve_model_dir(run) == latest_model_dir(run)
    assert same_weights(load_model(run)[0], small_model(2))
    exported = save_model_dir(ckpts / "step-5", 5, gpt2)  # a model dir without training state
    (ckpts / "latest").unlink()
    (ckpts / "latest.txt").write_text("step-9\n")  # names a step that is gone
    assert latest_model_dir(run) == ckpts / "step-5"  # the highest loadable step
    assert same_weights(load_model(run)[0], exported)
    assert latest_checkpoint(run) == ckpts / "step-2"  # resuming still needs training state
    assert latest_model_dir(tmp_path / "nothing") is None


def test_resuming_and_loading_agree_on_latest(tmp_path, gpt2):
    """One "latest" rule: after a crash between the two pointer writes (the `latest` link
    already names step-3, `latest.txt` still step-2), `--resume` and `--model RUN` both take
    step-3; a pointer to a pruned step is passed over by both."""
    from dtl.run_dir import latest_checkpoint, latest_model_dir
    from dtl.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (1, 2, 3):
        save_checkpoint(run, step, small_model(step), {"step": step}, tokenizer=gpt2)
    (ckpts / "latest.txt").write_text("step-2\n")  # the link (step-3) was written first
    assert latest_checkpoint(run) == latest_model_dir(run) == ckpts / "step-3"
    assert same_weights(load_model(run)[0], small_model(3))
    (ckpts / "latest").unlink()
    os.symlink("step-9", ckpts / "latest")  # a step that is gone; latest.txt names step-2
    assert latest_checkpoint(run) == latest_model_dir(run) == ckpts / "step-2"
    assert latest_checkpoint(ckpts) == latest_model_dir(ckpts) == ckpts / "step-2"


def test_read_model_config_reads_the_config_without_the_weights(tmp_path, gpt2):
    from dtl.model.store import read_model_config

    save_model_dir(tmp_path / "run" / "checkpoints" / "step-4", 4, gpt2)
    path, config = read_model_config(tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / "step-4"
    assert config == small_model(4).config == load_model(tmp_path / "run")[0].config
    # A legacy .pt: the sizes its shapes imply (n_heads 8 below width 768; the saved
    # positional table's length as max_seq_length), as load_model reads them.
    legacy = ModelConfig(vocab_size=300, d_model=24, n_heads=8, n_layers=2, d_ff=40,
                         max_seq_length=48)  # fmt: skip
    state = dict(TransformerLM(legacy).state_dict())
    state["pos_encoding.pe"] = torch.zeros(48, 1, 24)  # the original scripts saved the table
    torch.save({"model_state_dict": state}, tmp_path / "old.pt")
    path, config = read_model_config(tmp_path / "old.pt")
    assert (path, config) == (tmp_path / "old.pt", legacy)
    # A file from before torch 1.6 (not a zip archive) cannot be memory-mapped: read whole.
    torch.save({"model_state_dict": state}, tmp_path / "older.pt",
               _use_new_zipfile_serialization=False)  # fmt: skip
    assert read_model_config(tmp_path / "older.pt")[1] == legacy
    with pytest.raises(DtlError, match="not a loadable PyTorch checkpoint"):
        (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
        read_model_config(tmp_path / "broken.pt")
