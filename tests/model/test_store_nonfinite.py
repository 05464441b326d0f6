"""Weights holding NaN or Inf (a damaged model.safetensors) are refused at load, with one line
naming the tensor, in every verb that loads a model; not a traceback, `!!!!!` or perplexity nan."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from dtl import DtlError, ModelConfig, TransformerLM
from dtl.model.store import load_model


def _model_dir(directory, tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                         max_seq_length=32)  # fmt: skip
    TransformerLM(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def _poke_ff(path, tensor, count):
    """Set the first `count` bytes of `tensor` in a safetensors file to 0xFF, reading the
    format by hand (8-byte little-endian header size, JSON header, raw data): an fp32 of
    0xFFFFFFFF is a NaN."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    start = 8 + header_len + header[tensor]["data_offsets"][0]
    raw[start : start + count] = b"\xff" * count
    path.write_bytes(bytes(raw))


@pytest.fixture
def corrupt_dir(tmp_path, gpt2):
    directory = _model_dir(tmp_path / "m", gpt2)
    _poke_ff(directory / "model.safetensors", "ln_f.weight", 8)  # two NaNs
    return directory


def test_a_model_with_nan_weights_is_refused_at_load(corrupt_dir):
    with pytest.raises(DtlError, match=r"ln_f\.weight holds 2 non-finite value"):
        load_model(corrupt_dir)


def test_inf_is_refused_too(tmp_path, gpt2):
    directory = _model_dir(tmp_path / "m", gpt2)
    model = TransformerLM.from_pretrained(directory)
    with torch.no_grad():
        model.head.bias[3] = float("inf")
    model.save_pretrained(directory)
    with pytest.raises(DtlError, match=r"head\.bias holds 1 non-finite"):
        load_model(directory)


def test_a_sound_model_still_loads(tmp_path, gpt2):
    model, _ = load_model(_model_dir(tmp_path / "m", gpt2))
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "a", "--max-new-tokens", "3"],
        ["ask", "--max-new-tokens", "3", "What?"],
        ["eval", "--data", "TEXT"],
    ],
    ids=["generate", "ask", "eval"],
)
def test_every_verb_gives_one_line(dtl, corrupt_dir, tmp_path, argv):
    text = tmp_path / "t.txt"
    text.write_text("Some words to score.\n" * 4)
    argv = [str(text) if a == "TEXT" else a for a in argv]
    code, out, err = dtl(argv[0], "--model", str(corrupt_dir), *argv[1:])
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"dtl {argv[0]}: error: ") and "Traceback" not in err, err
    assert "ln_f.weight" in lines[-1] and "non-finite" in lines[-1], err
    assert "nan" not in out.lower() and "!!!" not in out, out
