"""`--dtype` through every verb that loads a model (generate, ask, chat, eval, serve): each
format reaches the model the verb runs, the verb says which, `auto` follows the CPU (its
detection faked both ways), a bad value is one line with exit 2, and an int8 model serves
over HTTP the answers the library gives it."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from dtl.data.sources import iter_records
from dtl.generate import generate
from dtl.generate.evaluate import evaluate_lm
from dtl.model.store import load_model
from dtl.serve.api import create_app

PROMPT = "The river"


def greedy_text(run, dtype: str, prompt: str = PROMPT, n: int = 8) -> str:
    """The oracle: the library's greedy continuation with the model loaded in `dtype`."""
    model, tok = load_model(run, dtype=dtype)
    return generate(model, tok, prompt, max_new_tokens=n, temperature=0)[0].text


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_generate_runs_the_model_in_the_dtype_asked_for(dtl, trained_run, dtype):
    code, out, err = dtl("generate", "--model", trained_run, "--prompt", PROMPT,
                         "--max-new-tokens", 8, "--temperature", 0, "--dtype", dtype)  # fmt: skip
    assert code == 0, err
    assert f"dtype: {dtype} (--dtype {dtype})" in err.splitlines()
    assert out.rstrip("\n") == greedy_text(trained_run, dtype)


def test_the_formats_really_differ_where_the_model_runs(trained_run):
    """What makes the test above able to tell the formats apart: their logits differ."""
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    logits = {d: load_model(trained_run, dtype=d)[0](ids) for d in ("fp32", "bf16", "int8")}
    assert not torch.equal(logits["fp32"], logits["bf16"])
    assert not torch.equal(logits["fp32"], logits["int8"])


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_ask_and_chat_take_dtype(dtl, trained_run, monkeypatch, dtype):
    code, out, err = dtl("ask", "--model", trained_run, "Who?", "--max-new-tokens", 4,
                         "--dtype", dtype)  # fmt: skip
    assert code == 0, err
    assert f"dtype: {dtype} (--dtype {dtype})" in err
    lines = iter(["Who?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = dtl("chat", "--model", trained_run, "--max-new-tokens", 4, "--dtype", dtype)
    assert code == 0, err
    assert f"dtype: {dtype} (--dtype {dtype})" in err


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_eval_says_the_dtype_beside_its_perplexity(dtl, trained_run, dtype):
    held_out = trained_run.parent / "held_out.txt"
    code, out, err = dtl("eval", "--model", trained_run, "--data", held_out, "--kind", "text",
                         "--dtype", dtype)  # fmt: skip
    assert code == 0, err
    model, tok = load_model(trained_run, dtype=dtype)
    texts = [r["text"] for r in iter_records(held_out, "text")]  # as the verb reads the file
    expected = evaluate_lm(model, tok, texts, 8, None, False)["perplexity"]
    assert f"perplexity {expected:.3f}, " in out and out.rstrip().endswith(f"({dtype})")
    code, out, err = dtl("eval", "--model", trained_run, "--data", held_out, "--kind", "text",
                         "--dtype", dtype, "--json")  # fmt: skip
    assert json.loads(out)["dtype"] == dtype


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(dtl, trained_run, monkeypatch, native):
    monkeypatch.setattr("dtl.device.cpu_has_native_bf16", lambda cpuinfo=None: native)
    want = "int8" if native else "fp32"
    code, out, err = dtl("generate", "--model", trained_run, "--prompt", PROMPT,
                         "--max-new-tokens", 8, "--temperature", 0)  # fmt: skip
    assert code == 0, err
    assert f"dtype: {want} (auto: " in err
    assert out.rstrip("\n") == greedy_text(trained_run, want)
    code, out, err = dtl("eval", "--model", trained_run, "--data",
                         trained_run.parent / "held_out.txt", "--kind", "text")  # fmt: skip
    assert code == 0 and out.rstrip().endswith(f"({want})")


@pytest.mark.parametrize("verb", ["generate", "ask", "chat", "eval", "serve"])
def test_a_bad_dtype_is_one_line_and_exit_2(dtl, trained_run, verb):
    extra = {"generate": ["--prompt", "Hi"], "ask": ["Who?"], "chat": [],
             "eval": ["--data", trained_run.parent / "held_out.txt"],
             "serve": ["--port", "8765"]}[verb]  # fmt: skip
    code, out, err = dtl(verb, "--model", trained_run, "--dtype", "fp16", *extra)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"dtl {verb}: error: --dtype fp16: not a format; choose one of auto, fp32, bf16, int8"
    ]


def test_int8_through_the_server(trained_run):
    model, tok = load_model(trained_run, dtype="int8")
    with TestClient(create_app(model, tok, "m")) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["dtype"] == "int8"
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                                 "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
    assert text == greedy_text(trained_run, "int8")
