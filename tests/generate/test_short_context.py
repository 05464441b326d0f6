"""A model trained at a context shorter than every default answers on every path with its
defaults: `dtl prepare --max-length 32` + `dtl train --seq-len 32`, then `dtl ask` (64 new
tokens by default), `dtl generate` (100), Python's `generate` (64), the server's completions
and chat (128). Each cuts max_new_tokens to the room the prompt leaves and says so, by the
one rule (`dtl.generate.context`); the answers are checked against greedy decoding by full
recomputation, written out here."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from fastapi.testclient import TestClient
from testkit import shared_path

from dtl import DtlError
from dtl.cli import main
from dtl.data.qa import QA_STOPS, qa_prompt
from dtl.generate import generate
from dtl.generate.sampling import ASK_DEFAULTS
from dtl.model.store import load_model
from dtl.serve.api import create_app

CONTEXT = 32


def _dtl(*args) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained at --seq-len 32 (3 steps of a 50k-parameter model: seconds)."""
    work = tmp_path_factory.mktemp("short")
    text = work / "text.raw"
    text.write_bytes(shared_path("wikitext-2-raw", "wiki.test.raw").read_bytes()[:60_000])
    _dtl("tokenizer", "train", text, "--vocab-size", 512, "-o", work / "tok")
    _dtl("prepare", text, "--kind", "wikitext", "--max-length", CONTEXT, "--tokenizer",
         work / "tok", "-o", work / "data")  # fmt: skip
    _dtl("train", "--data", work / "data", "--out", work / "run", "--seq-len", CONTEXT,
         "--preset", "tiny", "--d-model", 32, "--n-heads", 2, "--n-layers", 2, "--d-ff", 64,
         "--max-steps", 3, "--batch-size", 4, "--device", "cpu", "--no-progress")  # fmt: skip
    return work / "run"


@pytest.fixture(scope="module")
def loaded(run):
    model, tok = load_model(run)
    assert model.config.context == CONTEXT
    return model, tok


def greedy(model, tok, ids: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """The oracle: n greedy tokens after `ids` (fewer at end-of-text), each from a full
    forward of everything so far, with CTRL's repetition penalty on every token seen."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1].clone()
            seen = torch.tensor(sorted(set(seq)))
            old = logits[seen]
            logits[seen] = torch.where(old > 0, old / penalty, old * penalty)
            token = int(logits.argmax())
            if token == tok.eos_id:
                break
            seq.append(token)
    return seq[len(ids) :]


def answer_text(tok, new: list[int]) -> str:
    """The text of new tokens, up to the first Q&A stop string."""
    text = tok.decode_bytes(new).decode("utf-8", errors="replace")
    ends = [text.find(s) for s in QA_STOPS if s in text]
    return text[: min(ends)] if ends else text


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note:")]


def test_dtl_ask_answers_with_its_defaults_and_says_what_was_cut(run, loaded, dtl):
    model, tok = loaded
    ids = tok.encode(qa_prompt("Who is Romeo?"))
    room = CONTEXT - len(ids)
    assert room < ASK_DEFAULTS.max_new_tokens  # the default does not fit
    code, out, err = dtl("ask", "--model", run, "Who is Romeo?")
    assert code == 0, err
    assert notes(err) == [f"note: max_new_tokens cut from 64 to {room}: the model's context "
                          f"is {CONTEXT} tokens and the prompt takes {len(ids)}"]  # fmt: skip
    want = greedy(model, tok, ids, room, ASK_DEFAULTS.repetition_penalty)
    assert out == answer_text(tok, want).lstrip() + "\n"


def test_dtl_generate_cuts_its_default_and_drops_only_what_must_go(run, loaded, dtl):
    model, tok = loaded
    prompt = "The history of the"
    ids = tok.encode(prompt)
    code, out, err = dtl("generate", "--model", run, "--prompt", prompt, "--temperature", 0)
    assert code == 0, err
    room = CONTEXT - len(ids)
    assert notes(err) == [f"note: max_new_tokens cut from 100 to {room}: the model's context "
                          f"is {CONTEXT} tokens and the prompt takes {len(ids)}"]  # fmt: skip
    assert out == tok.decode(greedy(model, tok, ids, room)) + "\n"
    # a prompt longer than the context: its last 31 tokens and one new one
    long = " ".join(["The history of the city"] * 10)
    ids = tok.encode(long)
    assert len(ids) > CONTEXT
    code, out, err = dtl("generate", "--model", run, "--prompt", long, "--temperature", 0,
                         "--max-new-tokens", 5)  # fmt: skip
    assert code == 0, err
    assert notes(err) == [f"note: the prompt's first {len(ids) - 31} of {len(ids)} tokens are "
                          "dropped and max_new_tokens cut from 5 to 1: the model's context is "
                          f"{CONTEXT} tokens"]  # fmt: skip
    assert out == tok.decode(greedy(model, tok, ids[-31:], 1)) + "\n"
    # what fits is left alone, without a note
    code, out, err = dtl("generate", "--model", run, "--prompt", prompt, "--temperature", 0,
                         "--max-new-tokens", 3)  # fmt: skip
    assert code == 0 and notes(err) == [], err


def test_python_generate_cuts_the_same_way(loaded):
    model, tok = loaded
    prompt = "The history of the"
    ids = tok.encode(prompt)
    room = CONTEXT - len(ids)
    (done,) = generate(model, tok, prompt, temperature=0)  # max_new_tokens 64 by default
    want = greedy(model, tok, ids, room)
    assert done.token_ids == want and done.prompt_tokens == len(ids)
    assert done.finish_reason == ("length" if len(want) == room else "stop")
    assert done.fit.note() == (f"max_new_tokens cut from 64 to {room}: the model's context is "
                               f"{CONTEXT} tokens and the prompt takes {len(ids)}")  # fmt: skip
    # truncate=False: the answer is still cut, but no prompt token is ever dropped
    assert generate(model, tok, prompt, temperature=0, truncate=False)[0].token_ids == want
    long = " ".join(["The history of the city"] * 10)
    with pytest.raises(DtlError, match=f"the model's context is {CONTEXT}, with no room left"):
        generate(model, tok, long, temperature=0, truncate=False)


def test_the_server_cuts_completions_and_chat_the_same_way(loaded):
    model, tok = loaded
    with TestClient(create_app(model, tok, "short")) as client:
        prompt = "The history of the"
        ids = tok.encode(prompt)
        room = CONTEXT - len(ids)
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 64,
                                                 "temperature": 0})  # fmt: skip
        assert r.status_code == 200, r.text
        want = greedy(model, tok, ids, room)
        assert r.json()["choices"][0]["text"] == tok.decode(want)
        assert r.json()["usage"]["completion_tokens"] == len(want)
        question = qa_prompt("Who is Romeo?")
        ids = tok.encode(question)
        r = client.post("/v1/chat/completions", json={  # chat's default: 128 new tokens
            "messages": [{"role": "user", "content": "Who is Romeo?"}], "temperature": 0})
        assert r.status_code == 200, r.text
        want = greedy(model, tok, ids, CONTEXT - len(ids))
        message = r.json()["choices"][0]["message"]["content"]
        assert message == answer_text(tok, want).lstrip()
        r = client.post("/v1/completions", json={"prompt": " ".join(["The city"] * 40)})
        assert r.status_code == 400  # the server never drops prompt tokens
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_dtl_chat_leaves_out_old_turns_whole_then_cuts_the_answer(run, loaded, dtl, monkeypatch):
    model, tok = loaded
    lines = iter(["Who is Romeo?", "Who is Juliet?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = dtl("chat", "--model", run)  # 128 new tokens by default
    assert code == 0, err
    first, second = (tok.encode(qa_prompt(q)) for q in ("Who is Romeo?", "Who is Juliet?"))
    cut = "note: max_new_tokens cut from 128 to {}: the model's context is 32 tokens and the " \
          "prompt takes {}"  # fmt: skip
    assert notes(err) == [
        cut.format(CONTEXT - len(first), len(first)),
        "note: the oldest 1 of 1 earlier turns are left out so the question and 128 new "
        "tokens fit the model's 32-token context",
        cut.format(CONTEXT - len(second), len(second)),
    ]
    penalty = ASK_DEFAULTS.repetition_penalty
    answers = [answer_text(tok, greedy(model, tok, ids, CONTEXT - len(ids), penalty)).lstrip()
               for ids in (first, second)]  # fmt: skip
    assert f"dtl> {answers[0]}\n" in out and f"dtl> {answers[1]}\n" in out
