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
