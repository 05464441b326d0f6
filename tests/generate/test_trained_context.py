"""The context a model was trained at (`ModelConfig.context`): eval scores in windows of it,
generation keeps prompt + new tokens inside it, `dtl info` says it, and a model dir saved
before it was recorded still loads and falls back to max_seq_length."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from testkit import run_cli

from dtl import DtlError, ModelConfig, TransformerLM
from dtl.generate import generate_tokens
from dtl.generate.evaluate import evaluate_lm
from dtl.model.store import load_model

# positions 16..63 exist in the model (max_seq_length 64) but were never trained
TRAINED = 16


def model_trained_at_16(vocab_size: int = 97) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                         max_seq_length=64, trained_seq_len=TRAINED)  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():  # larger logits than the init's, so greedy paths are not ties
        model.head.weight.mul_(20)
    return model


def test_context_is_the_trained_length_else_max_seq_length():
    assert model_trained_at_16().config.context == TRAINED
    assert ModelConfig(max_seq_length=64).context == 64  # nothing recorded
    # what a model trained at is no part of which model it is (a resume compares sizes)
    assert ModelConfig(max_seq_length=64, trained_seq_len=8) == ModelConfig(max_seq_length=64)
    with pytest.raises(DtlError, match="trained_seq_len.*max_seq_length \\(64\\)"):
        ModelConfig(max_seq_length=64, trained_seq_len=65)


def test_eval_scores_in_windows_of_the_trained_context(gpt2):
    model = model_trained_at_16(gpt2.vocab_size)
    text = (
        "The Normans were the people who gave their name to Normandy, a region in "
        "northern France. They were descended from Norse raiders and pirates from Denmark, "
        "Iceland and Norway who swore fealty to King Charles III of West Francia."
    )
    ids = [gpt2.eos_id] + gpt2.encode(text)
    assert len(ids) > 2 * TRAINED + 1  # several windows, the last one short
    with torch.no_grad():  # the oracle: each 16-token window on its own, by hand
        nll, n = 0.0, 0
        for start in range(0, len(ids) - 1, TRAINED):
            x = ids[start : start + TRAINED]
            y = ids[start + 1 : start + TRAINED + 1]
            x = x[: len(y)]
            logits = model(torch.tensor([x]))[0]
            nll += float(F.cross_entropy(logits, torch.tensor(y), reduction="sum"))
            n += len(y)
        whole = model(torch.tensor([ids]))[0, :-1]  # what scoring past position 16 would give
        past = float(F.cross_entropy(whole, torch.tensor(ids[1:])))
    out = evaluate_lm(model, gpt2, [text])
    assert out["tokens"] == n == len(ids) - 1
    assert out["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert out["nll"] != pytest.approx(past, rel=1e-3)  # the windows matter


def test_generation_keeps_prompt_and_answer_inside_the_trained_context():
    model = model_trained_at_16()

    def greedy(seq: list[int], n: int) -> list[int]:  # the oracle: full recomputation
        seq = list(seq)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        return seq

    prompt = list(range(1, 31))  # 30 tokens: fits max_seq_length 64, not the context 16
    out = generate_tokens(model, torch.tensor([prompt]), 6, temperature=0)
    assert out.size(1) == TRAINED  # the prompt fills it: its last 15 tokens + 1 new
    assert out[0].tolist() == greedy(prompt[-15:], 1)
    out = generate_tokens(model, torch.tensor([prompt[:10]]), 16, temperature=0)
    assert out[0].tolist() == greedy(prompt[:10], 6)  # 16 new tokens cut to the 6 left
    with pytest.raises(DtlError, match="the prompt is 30 tokens but the model's context is 16"):
        generate_tokens(model, torch.tensor([prompt]), 6, truncate=False)


def test_a_model_dir_saved_before_the_field_loads_with_max_seq_length(tmp_path, gpt2):
    model = model_trained_at_16(gpt2.vocab_size)
    model.save_pretrained(tmp_path)
    gpt2.save(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["trained_seq_len"] == TRAINED and saved["base_seq_len"] is None
    del saved["trained_seq_len"], saved["base_seq_len"]  # as written before this change
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old, _ = load_model(tmp_path)
    assert old.config.trained_seq_len is None and old.config.context == 64
    for a, b in zip(old.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dtl_info_says_what_the_model_trained_at(tmp_path, capsys):
    config = ModelConfig.preset("tiny", vocab_size=97, trained_seq_len=128, base_seq_len=256)
    TransformerLM(config).save_pretrained(tmp_path)
    code, out, err = run_cli(["info", "--config", str(tmp_path)], capsys)
    assert code == 0, err
    assert "context 128 tokens: trained at 128 (fine-tuned from a model trained at 256)" in out
    code, out, err = run_cli(["info", "--config", str(tmp_path), "--json"], capsys)
    report = json.loads(out)
    assert report["context"] == 128 and report["memory"]["seq_len"] == 128


def test_dtl_eval_json_names_the_window(tmp_path, dtl, gpt2):
    model = model_trained_at_16(gpt2.vocab_size)
    model.save_pretrained(tmp_path / "model")
    gpt2.save(tmp_path / "model")
    text = tmp_path / "doc.txt"
    text.write_text("Rollo was a Viking who became the first ruler of Normandy. " * 4)
    code, out, err = dtl("eval", "--model", tmp_path / "model", "--data", text, "--json")
    assert code == 0, err
    scores = json.loads(out)
    assert scores["window"] == TRAINED
    assert err.splitlines()[0].startswith("threads: 1 (OMP_NUM_THREADS")  # conftest's one
