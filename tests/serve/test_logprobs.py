"""What lm-evaluation-harness and other OpenAI clients need beyond plain generation, served
for real on a loopback port: completions `logprobs` and `echo` (against log_softmax of the
model's own forward), token-id prompts, chat `logprobs`, the tokenizer endpoints, penalties
and logit_bias over the wire, and a 400 naming every field the server does not serve."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from dtl import ModelConfig, TransformerLM
from dtl.data.qa import qa_prompt
from dtl.serve.api import create_app

NAME = "tiny-test"


@pytest.fixture(scope="module")
def tokenizer():
    from testkit import shared_path

    from dtl.tokenizer import load_tokenizer

    return load_tokenizer("gpt2", gpt2_dir=shared_path("gpt2"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=64)  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():  # peaky logits: greedy text is varied, not a run of one token
        model.head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def url(model, tokenizer):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer, NAME),
                                           log_level="warning", lifespan="off"))  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def post(url: str, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(f"{url}{path}", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


@torch.no_grad()
def log_probs(model, ids: list[int]) -> torch.Tensor:
    """(T, V): log_softmax of the model's logits at every position of `ids` (the oracle)."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def text_of(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


# ---------------------------------------------------------------------- completions
def test_logprobs_are_the_raw_distribution_also_when_penalties_pick(url, model, tokenizer):
    """Greedy with a frequency penalty: the tokens are those the penalised logits pick, and
    each figure is log_softmax of the raw logits (before the penalty), top 3 beside it."""
    prompt = tokenizer.encode("The Normans were")
    got = post(url, "/v1/completions", {"prompt": "The Normans were", "max_tokens": 6,
                                        "temperature": 0, "frequency_penalty": 2.0,
                                        "logprobs": 3})["choices"][0]  # fmt: skip
    seq, drawn = list(prompt), Counter()
    want_tokens, want_lps, want_tops = [], [], []
    for _ in range(6):
        raw = log_probs(model, seq)[-1]
        logits = model(torch.tensor([seq]))[0, -1].detach().clone()
        for token, count in drawn.items():
            logits[token] -= 2.0 * count
        token = int(logits.argmax())
        drawn[token] += 1
        seq.append(token)
        want_tokens.append(text_of(tokenizer, token))
        want_lps.append(float(raw[token]))
        values, ids = raw.topk(3)
        want_tops.append({text_of(tokenizer, int(i)): float(v) for v, i in zip(values, ids, strict=True)})
    lp = got["logprobs"]
    assert lp["tokens"] == want_tokens
    assert got["text"] == "".join(want_tokens)
    assert lp["token_logprobs"] == pytest.approx(want_lps, abs=1e-4)
    assert [list(t) for t in lp["top_logprobs"]] == [list(t) for t in want_tops]
    for top, want in zip(lp["top_logprobs"], want_tops, strict=True):
        assert list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)
    pairs = zip(lp["token_logprobs"], lp["top_logprobs"], strict=True)
    assert any(t != max(top.values()) for t, top in pairs)  # the penalty changed a pick
    offsets = [sum(len(t) for t in want_tokens[:i]) for i in range(6)]
    assert lp["text_offset"] == offsets


def test_echo_scores_a_token_id_prompt(url, model, tokenizer):
    """lm-evaluation-harness's request: token ids, echo, logprobs 1, max_tokens 1, greedy."""
    ids = tokenizer.encode("William the Conqueror landed at Pevensey in 1066")
    oracle = log_probs(model, ids)
    got = post(url, "/v1/completions", {"prompt": [ids], "echo": True, "logprobs": 1,
                                        "max_tokens": 1, "temperature": 0})  # fmt: skip
    choice = got["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1
    assert lp["tokens"][: len(ids)] == [text_of(tokenizer, t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [float(oracle[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=1e-4)
    best = int(oracle[-1].argmax())  # the one drawn: greedy, so it is the top one exactly
    assert lp["tokens"][-1] == text_of(tokenizer, best)
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    for i in range(1, len(ids)):  # top 1 at each prompt position: the model's argmax there
        top = int(oracle[i - 1].argmax())
        assert list(lp["top_logprobs"][i]) == [text_of(tokenizer, top)]
    assert choice["text"] == tokenizer.decode(ids) + text_of(tokenizer, best)
    assert got["usage"]["prompt_tokens"] == len(ids)


def test_max_tokens_zero_with_echo_scores_only_and_rows_are_separate(url, model, tokenizer):
    a, b = tokenizer.encode("In 1066"), tokenizer.encode("Rollo was a Viking leader")
    got = post(url, "/v1/completions", {"prompt": [a, b], "echo": True, "logprobs": 0,
                                        "max_tokens": 0})  # fmt: skip
    assert [c["index"] for c in got["choices"]] == [0, 1]
    for ids, choice in zip((a, b), got["choices"], strict=True):
        oracle = log_probs(model, ids)
        assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        want = [float(oracle[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        assert lp["top_logprobs"][1:] == [{}] * (len(ids) - 1)  # logprobs 0: no alternatives
    assert got["usage"]["completion_tokens"] == 0
    # a prompt may fill the whole context when nothing is generated
    full = post(url, "/v1/completions", {"prompt": [list(range(100, 164))], "echo": True,
                                         "logprobs": 0, "max_tokens": 0})  # fmt: skip
    assert len(full["choices"][0]["logprobs"]["tokens"]) == 64


def test_string_and_token_id_prompts_give_the_same_completion(url, tokenizer):
    body = {"max_tokens": 8, "temperature": 0}
    text = post(url, "/v1/completions", {**body, "prompt": ["In 1066", "Rollo"]})
    ids = post(url, "/v1/completions", {**body, "prompt": [tokenizer.encode("In 1066"),
                                                          tokenizer.encode("Rollo")]})  # fmt: skip
    one = post(url, "/v1/completions", {**body, "prompt": tokenizer.encode("Rollo")})
    assert [c["text"] for c in ids["choices"]] == [c["text"] for c in text["choices"]]
    assert one["choices"][0]["text"] == text["choices"][1]["text"]
    assert ids["usage"] == text["usage"]


def test_streamed_logprobs_equal_the_whole_response(url):
    body = {"prompt": "The Normans", "max_tokens": 10, "temperature": 0, "logprobs": 2}
    whole = post(url, "/v1/completions", body)["choices"][0]["logprobs"]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    parts = [json.loads(line)["choices"][0]["logprobs"] for line in lines]
    merged = {k: [x for p in parts if p for x in p[k]] for k in whole}
    assert merged == whole


def test_logit_bias_forces_and_bans_tokens(url, tokenizer):
    forced = tokenizer.encode(" Normandy")[0]
    got = post(url, "/v1/completions", {"prompt": "In 1066", "max_tokens": 4, "temperature": 0,
                                        "logit_bias": {str(forced): 100}})  # fmt: skip
    assert got["choices"][0]["text"] == tokenizer.decode([forced] * 4)
    plain = post(url, "/v1/completions", {"prompt": "In 1066", "max_tokens": 1,
                                          "temperature": 0, "logprobs": 0})  # fmt: skip
    top = tokenizer.encode(plain["choices"][0]["text"])[0]
    banned = post(url, "/v1/completions", {"prompt": "In 1066", "max_tokens": 1,
                                           "temperature": 0, "logprobs": 0,
                                           "logit_bias": {str(top): -100}})  # fmt: skip
    assert banned["choices"][0]["text"] != plain["choices"][0]["text"]
    # the figure is still the raw distribution's: lower than the unbiased top token's
    assert (banned["choices"][0]["logprobs"]["token_logprobs"][0]
            < plain["choices"][0]["logprobs"]["token_logprobs"][0])  # fmt: skip


# ---------------------------------------------------------------------- chat
def test_chat_logprobs_in_openais_shape(url, model, tokenizer):
    body = {"messages": [{"role": "user", "content": "Who was Rollo?"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    got = post(url, "/v1/chat/completions", body)["choices"][0]
    content = got["logprobs"]["content"]
    assert got["logprobs"]["refusal"] is None
    seq = tokenizer.encode(qa_prompt("Who was Rollo?"))
    for item in content:
        raw = log_probs(model, seq)[-1]
        token = int(raw.argmax())  # greedy, no penalties: the top token
        assert item["bytes"] == list(tokenizer.decode_bytes([token]))
        assert item["token"] == text_of(tokenizer, token)
        assert item["logprob"] == pytest.approx(float(raw[token]), abs=1e-4)
        values, ids = raw.topk(2)
        assert [t["bytes"] for t in item["top_logprobs"]] == [
            list(tokenizer.decode_bytes([int(i)])) for i in ids
        ]
        assert [t["logprob"] for t in item["top_logprobs"]] == pytest.approx(
            values.tolist(), abs=1e-4
        )
        seq.append(token)
    text = bytes(b for item in content for b in item["bytes"]).decode()
    assert text.lstrip().startswith(got["message"]["content"])
    plain = post(url, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={"model": NAME, **body, "stream": True}) as r:  # fmt: skip
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [x for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for x in c["choices"][0]["logprobs"]["content"]]  # fmt: skip
    assert streamed == content


# ---------------------------------------------------------------------- the tokenizer
def test_tokenize_detokenize_and_tokenizer_info(url, tokenizer):
    text = "Hello world<|endoftext|>Rollo"
    got = post(url, "/tokenize", {"prompt": text, "add_special_tokens": False,
                                  "return_token_strs": True})  # fmt: skip
    want = tokenizer.encode("Hello world") + [tokenizer.eos_id] + tokenizer.encode("Rollo")
    assert got["tokens"] == want and got["count"] == len(want)
    assert got["max_model_len"] == 64
    assert got["token_strs"] == [tokenizer.decode([t]) for t in want]
    assert post(url, "/detokenize", {"tokens": want}) == {"prompt": text}
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": "Who?"}]})
    assert chat["tokens"] == tokenizer.encode(qa_prompt("Who?"))
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    assert post(url, "/tokenize", {"prompt": info["eos_token"]})["tokens"] == [tokenizer.eos_id]
    bad = post(url, "/detokenize", {"tokens": [1, 99999999]}, status=400)
    assert bad["error"]["param"] == "tokens" and "99999999" in bad["error"]["message"]


def test_tokenizer_endpoints_need_the_api_key_when_set(model, tokenizer):
    app = create_app(model, tokenizer, NAME, api_key="s3cret")
    client = TestClient(app)
    assert client.get("/tokenizer_info").status_code == 401
    assert client.post("/tokenize", json={"prompt": "Hi"}).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    got = client.post("/tokenize", json={"prompt": "Hi"}, headers=auth)
    assert got.status_code == 200 and got.json()["tokens"] == tokenizer.encode("Hi")


# ---------------------------------------------------------------------- what is not served
@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"suffix": " end"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"frobnicate": 1}, "frobnicate"),
        ("/v1/completions", {"top_logprobs": 2}, "top_logprobs"),  # chat's, not completions'
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"echo": True, "stream": True}, "echo"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),  # without echo
        ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
        ("/v1/completions", {"prompt": [50257]}, "prompt"),
        ("/v1/completions", {"logit_bias": {"the": 1}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"5": 150}}, "logit_bias"),
        ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"echo": True}, "echo"),
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
        ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ],
)
def test_unserved_fields_are_a_400_that_names_them(url, path, body, param):
    base = ({"prompt": "Hello"} if "chat" not in path
            else {"messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    error = post(url, path, {**base, "max_tokens": 2, **body}, status=400)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and param in error["message"]


def test_served_no_op_fields_are_accepted(url):
    """best_of equal to n, text response_format, tool_choice none, user/metadata: 200."""
    post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "n": 2, "best_of": 2,
                                  "user": "u1", "suffix": None})  # fmt: skip
    post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                       "max_tokens": 2, "response_format": {"type": "text"},
                                       "tool_choice": "none", "metadata": {"a": "b"},
                                       "parallel_tool_calls": False})  # fmt: skip


def test_stop_takes_lm_evals_five_strings_and_refuses_seventeen(url):
    stops = ["Question:", "</s>", "<|im_end|>", "\n\n", "<|endoftext|>"]  # a task's + end-of-text
    post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "stop": stops})
    error = post(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2,
                                          "stop": [str(i) for i in range(17)]}, 400)["error"]
    assert error["param"] == "stop" and "16" in error["message"]
