"""Answers end: `dtl ask`, `dtl chat` and the API's chat completions stop at end-of-text and
at the Q&A template's next marker ("\\nQuestion:", "\\nAnswer:"), never showing the marker,
while plain completions keep OpenAI's semantics (the client's `stop` and end-of-text only).

The model is a scripted stand-in whose n-th new token is fixed, so the exact text it would
write past the stop is known and can be checked to be absent.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from test_generate import ScriptedLM

from dtl.data.qa import QA_STOPS, qa_stops
from dtl.serve.api import create_app

ANSWER = " Rollo was a Viking leader."
RUN_ONS = {  # what the model writes after its answer -> the case's name
    "end-of-text": None,  # the end-of-text token itself
    "next question": "\nQuestion: Who was his son?\nAnswer: William.",
    "second answer": "\nAnswer: He was a Viking.",
}


class Scripted(ScriptedLM):
    def num_parameters(self) -> int:
        return 1


def scripted(gpt2, run_on: str | None) -> Scripted:
    ids = gpt2.encode(ANSWER)
    ids += [gpt2.eos_id, *gpt2.encode(" Question: more")] if run_on is None else gpt2.encode(run_on)
    return Scripted(ids + gpt2.encode(" and so on and on"), gpt2.vocab_size)


def test_the_qa_stop_set_is_the_templates_markers():
    assert QA_STOPS == ("\nQuestion:", "\nAnswer:")
    assert qa_stops(["."]) == ("\nQuestion:", "\nAnswer:", ".")
    assert qa_stops(["\nQuestion:"]) == QA_STOPS  # no duplicates


@pytest.mark.parametrize("run_on", RUN_ONS.values(), ids=RUN_ONS.keys())
def test_dtl_ask_prints_only_the_answer(dtl, gpt2, monkeypatch, run_on):
    monkeypatch.setattr(
        "dtl.model.store.load_model", lambda *a, **k: (scripted(gpt2, run_on), gpt2)
    )
    code, out, err = dtl("ask", "--model", "scripted", "Who was Rollo?")
    assert code == 0, err
    assert out == ANSWER.lstrip() + "\n"


@pytest.mark.parametrize("run_on", RUN_ONS.values(), ids=RUN_ONS.keys())
def test_dtl_chat_prints_only_the_answer_and_keeps_it_as_history(dtl, gpt2, monkeypatch, run_on):
    model = scripted(gpt2, run_on)
    monkeypatch.setattr("dtl.model.store.load_model", lambda *a, **k: (model, gpt2))
    lines = iter(["Who was Rollo?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = dtl("chat", "--model", "scripted")
    assert code == 0, err
    assert out.splitlines()[1] == "dtl> " + ANSWER.lstrip()


@pytest.fixture
def api(gpt2):
    def client(run_on):
        return TestClient(create_app(scripted(gpt2, run_on), gpt2, "scripted"))

    return client


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("run_on", RUN_ONS.values(), ids=RUN_ONS.keys())
def test_api_chat_stops_at_the_answers_end(api, run_on, stream):
    body = {"messages": [{"role": "user", "content": "Who was Rollo?"}], "temperature": 0,
            "stream": stream}  # fmt: skip
    with api(run_on) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    if stream:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        import json

        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        reason = [c["choices"][0]["finish_reason"] for c in chunks][-1]
    else:
        choice = response.json()["choices"][0]
        text, reason = choice["message"]["content"], choice["finish_reason"]
    assert text == ANSWER.lstrip() and reason == "stop"


def test_api_completions_keep_openai_stops(api, gpt2):
    """A plain completion does not stop at the Q&A markers, only at the client's stop."""
    run_on = RUN_ONS["next question"]
    prompt = "Question: Who was Rollo?\nAnswer:"
    with api(run_on) as client:
        full = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 14,
                                                    "temperature": 0}).json()  # fmt: skip
        cut = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 14,
                                                   "temperature": 0, "stop": "Who"}).json()  # fmt: skip
    want = gpt2.decode(gpt2.encode(ANSWER + run_on)[:14])
    assert full["choices"][0]["text"] == want and "\nQuestion:" in want
    assert cut["choices"][0]["text"] == want[: want.index("Who")]


def test_api_no_repeat_ngram_size_is_checked_and_honoured(api, gpt2):
    """dtl's documented extension: a bad value is OpenAI's 400 naming it; a good one bans
    the repeat the scripted model would write ("Rollo was a Viking leader." twice)."""
    with api(ANSWER * 2) as client:  # the script: the answer, then the answer again
        for bad in (-1, "3", 1.5, 100):
            r = client.post("/v1/completions", json={"prompt": "Hi", "no_repeat_ngram_size": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "no_repeat_ngram_size"
        body = {"prompt": "Q:", "max_tokens": 12, "temperature": 0}
        free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        banned = client.post("/v1/completions", json={**body, "no_repeat_ngram_size": 3})
    assert free.startswith(ANSWER + ANSWER[:5])
    text = banned.json()["choices"][0]["text"]
    # " Rollo was" is the trigram " Roll", "o", " was" again: " was" is banned and the
    # scripted model's next best is token 0, "!"
    assert [gpt2.decode([t]) for t in gpt2.encode(" Rollo was")] == [" Roll", "o", " was"]
    assert text.startswith(ANSWER + " Rollo!")
