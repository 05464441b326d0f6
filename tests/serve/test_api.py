"""The OpenAI-compatible API, served for real on a loopback port and driven by the official
`openai` client: completions, chat, streaming, n/seed/stop, the error cases, the API key,
16 concurrent streams, and a disconnecting client."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from testkit import LiveServer

import dtl.generate.loop
from dtl import ModelConfig, TransformerLM
from dtl.data.qa import qa_prompt, qa_stops
from dtl.generate import generate
from dtl.generate import loop as token_loop
from dtl.generate.loop import TokenLoop
from dtl.serve.api import chat_prompt, create_app
from dtl.serve.scheduler import END, Batcher, Job
from dtl.serve.wire import parse_request

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
                         max_seq_length=128)  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():  # peaky logits: greedy text is varied, not a run of one token
        model.head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with LiveServer(create_app(model, tokenizer, NAME)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)  # fmt: skip


def expected(model, tokenizer, prompt, n, stop=()):
    return generate(model, tokenizer, prompt, n, temperature=0, stop=list(stop))[0]


@contextmanager
def hold_worker(model, until, timeout: float = 20.0):
    """Inside, each step of the server's worker thread waits until `until()` is true (at most
    `timeout` seconds a step), so a test can pin down what happens between two steps."""
    original = dtl.generate.loop.last_logits  # every step of the token loop goes through it

    def gated(*args, **kwargs):
        if threading.current_thread().name == "dtl-generate":
            deadline = time.monotonic() + timeout
            while not until() and time.monotonic() < deadline:
                time.sleep(0.005)
        return original(*args, **kwargs)

    dtl.generate.loop.last_logits = gated
    try:
        yield
    finally:
        dtl.generate.loop.last_logits = original


@pytest.fixture
def gated_server(tokenizer):
    """A server of its own whose worker, once a long request (max_tokens > 50) has sent a
    chunk, takes no further step until that request is cancelled (at most 20 s): whether a
    client's leaving stops its generation can then be seen without any race."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=128)  # fmt: skip
    model = TransformerLM(config).eval()
    app = create_app(model, tokenizer, NAME)
    batcher = app.state.batcher

    def free():
        return not any(j.request.options.max_new_tokens > 50 and j.request.steps
                       and not j.cancelled for j in batcher.running)  # fmt: skip

    with hold_worker(model, free), LiveServer(app) as live:
        yield live


def wait_for(condition, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# ---------------------------------------------------------------------- the happy paths
def test_models_and_health(client, server, model):
    cards = client.models.list().data
    assert [c.id for c in cards] == [NAME]
    assert cards[0].object == "model"
    assert cards[0].model_extra["parameters"] == model.num_parameters()
    assert cards[0].model_extra["max_seq_length"] == 128
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_completion_equals_library_greedy(client, model, tokenizer):
    want = expected(model, tokenizer, "The Normans were", 12)
    got = client.completions.create(model=NAME, prompt="The Normans were", max_tokens=12,
                                    temperature=0)  # fmt: skip
    assert got.object == "text_completion" and got.model == NAME
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(tokenizer.encode("The Normans were"))
    assert got.usage.completion_tokens == 12
    assert got.usage.total_tokens == got.usage.prompt_tokens + 12


def test_streamed_completion_equals_whole(client, model, tokenizer):
    want = expected(model, tokenizer, "In 1066", 15)
    chunks = list(client.completions.create(model=NAME, prompt="In 1066", max_tokens=15,
                                            temperature=0, stream=True))  # fmt: skip
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_uses_the_qa_template_streamed_or_not(client, model, tokenizer):
    question = "Who was Rollo?"
    want = expected(model, tokenizer, qa_prompt(question), 10, stop=qa_stops()).text.lstrip()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                         temperature=0)  # fmt: skip
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want
    assert got.usage.prompt_tokens == len(tokenizer.encode(qa_prompt(question)))
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_chat_prompt_maps_history_to_answered_examples():
    messages = [
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare"},
        {"role": "user", "content": "When?"},
    ]
    assert chat_prompt(messages) == (
        "Question: Who wrote Hamlet?\nAnswer: Shakespeare\nQuestion: When?\nAnswer:"
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "Who "},
                                          {"type": "text", "text": "wrote it?"}]}]  # fmt: skip
    assert chat_prompt(parts) == "Question: Who wrote it?\nAnswer:"


def test_stop_n_and_seed(client, model, tokenizer):
    full = expected(model, tokenizer, "Rollo", 20).text
    words = full.split()
    stop = " " + words[len(words) // 2]
    cut = client.completions.create(model=NAME, prompt="Rollo", max_tokens=20, temperature=0,
                                    stop=[stop])  # fmt: skip
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    def sample(seed):
        out = client.completions.create(model=NAME, prompt="Rollo", max_tokens=8, n=3,
                                        temperature=1.0, seed=seed)  # fmt: skip
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert out.usage.completion_tokens == 24
        return [c.text for c in out.choices]

    first = sample(7)
    assert sample(7) == first  # same seed, same samples
    assert len(set(first)) > 1  # the n choices are separate samples
    assert sample(8) != first


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, param, code",
    [
        ({"model": "gpt-4"}, "model", "model_not_found"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": -1}, "max_tokens", "invalid_value"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"prompt": "word " * 200}, "prompt", "context_length_exceeded"),
        ({"prompt": "word " * 128}, "prompt", "context_length_exceeded"),  # no room left
        ({"n": 0}, "n", "invalid_value"),
    ],
)
def test_bad_requests_get_openai_shaped_400(client, kwargs, param, code):
    args = {"model": NAME, "prompt": "Hello", "max_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)
    assert info.value.status_code == 400
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code and error["message"]


def test_malformed_json_and_bad_fields_then_server_still_answers(server, client):
    for body in (b"{not json", b"[1, 2]", b'{"prompt": 5}', b'{"prompt": "x", "stop": 3}'):
        r = httpx.post(f"{server.url}/v1/completions", content=body,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    for messages in ([{"role": "assistant", "content": "hi"}], ["hi"],
                     [{"role": "user", "content": [{"type": "image_url"}]}],
                     [{"role": "wizard", "content": "hi"}]):  # fmt: skip
        r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", messages
    out = client.completions.create(model=NAME, prompt="still alive", max_tokens=2)
    assert out.choices[0].finish_reason == "length"


def test_api_key_required_when_set(model, tokenizer):
    with LiveServer(create_app(model, tokenizer, NAME, api_key="s3cret")) as live:
        wrong = openai.OpenAI(base_url=f"{live.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.completions.create(model=NAME, prompt="Hi", max_tokens=2)
        assert info.value.status_code == 401
        assert info.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{live.url}/v1/models").status_code == 401
        assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}  # open to probes
        right = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0)
        out = right.completions.create(model=NAME, prompt="Hi", max_tokens=2)
        assert len(out.choices) == 1


# ---------------------------------------------------------------------- concurrency
def test_sixteen_concurrent_streams_all_get_their_own_output(server, client, model, tokenizer):
    # each client samples with its own seed: a mixed-up cache or RNG would show
    prompts = [f"Story number {i}:" for i in range(16)]
    want = [generate(model, tokenizer, p, 8, temperature=1.0, seed=i)[0].text
            for i, p in enumerate(prompts)]  # fmt: skip

    def run(i):
        stream = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=8,
                                           temperature=1.0, seed=i, stream=True)  # fmt: skip
        return "".join(c.choices[0].text for c in stream)

    state = server.app.state
    state.largest_batch = 0  # earlier tests (n=3) have set it already
    # the first request to arrive holds the worker until two others wait (the client runs
    # at most 8 at once): those must then be decoded together, as one batch
    released = threading.Event()  # latched: from then on the worker runs freely

    def others_wait():
        if len(state.batcher.pending) >= 2:
            released.set()
        return released.is_set()

    with hold_worker(model, others_wait), ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, range(16)))
    assert got == want
    assert len(set(want)) == 16
    assert state.largest_batch >= 2  # waiting requests were decoded together


def test_client_disconnect_stops_its_generation(gated_server):
    state = gated_server.app.state
    body = {"model": NAME, "prompt": "Once", "max_tokens": 120, "temperature": 1.0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{gated_server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # the worker takes no step until the request is cancelled (or 20 s have passed, when
    # it would run all 120 tokens): a cancelled row is counted once, mid-generation
    wait_for(lambda: state.cancelled == 1, "generation went on after the client left")
    out = openai.OpenAI(base_url=f"{gated_server.url}/v1", api_key="unused",
                        max_retries=0).completions.create(model=NAME, prompt="after", max_tokens=3)  # fmt: skip
    assert out.usage.completion_tokens == 3


def test_client_that_leaves_a_non_streamed_request_stops_its_generation(gated_server):
    state = gated_server.app.state
    body = {"model": NAME, "prompt": "Once", "max_tokens": 120}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{gated_server.url}/v1/completions", json=body, timeout=1.0)
    wait_for(lambda: state.cancelled == 1, "generation went on after the client left")
    r = httpx.post(f"{gated_server.url}/v1/completions", timeout=30,
                   json={"model": NAME, "prompt": "after", "max_tokens": 3})  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------- found in review
def test_top_p_zero_is_greedy_and_answers(server, model, tokenizer):
    r = httpx.post(f"{server.url}/v1/completions", timeout=30,
                   json={"prompt": "hi", "max_tokens": 3, "top_p": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected(model, tokenizer, "hi", 3).text


def test_a_request_may_make_at_most_64_completions(server):
    url = f"{server.url}/v1/completions"
    for body, param in (({"prompt": ["x"] * 65}, "prompt"),
                        ({"prompt": ["x"] * 5, "n": 16}, "prompt"),
                        ({"prompt": ["x"] * 10_000, "n": 16}, "prompt")):  # fmt: skip
        r = httpx.post(url, json={**body, "max_tokens": 1}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == "too_many_completions"
        assert "at most 64" in error["message"]
    r = httpx.post(url, json={"prompt": ["x"] * 4, "n": 16, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 64


def _worker_run(model, tokenizer, prompts, max_tokens=5, worker=None):
    """Submit one greedy request per prompt to `worker` (a fresh one if None), all before it
    wakes; return {prompt: items it received} once each has ended, and the worker.
    max_tokens: one for all, or {prompt: max_tokens}."""
    if worker is None:
        state = SimpleNamespace(model=model, tokenizer=tokenizer, cancelled=0, largest_batch=0)
        worker = Batcher(state)
    got: dict[str, list] = {p: [] for p in prompts}
    with worker.ready:  # all wait before the worker wakes
        for prompt in prompts:
            n = max_tokens[prompt] if isinstance(max_tokens, dict) else max_tokens
            request, _ = parse_request({"temperature": 0, "max_tokens": n}, [prompt], tokenizer,
                                       128, 16)
            worker.submit(Job(request, got[prompt].append))
    wait_for(lambda: all(items and items[-1] is END for items in got.values()),
             "the worker did not finish every request")
    return got, worker


def test_a_request_that_fails_alone_does_not_fail_its_batch_neighbours(
    model, tokenizer, monkeypatch
):
    real = TokenLoop.add

    def fails_on_boom(self, input_ids, attention_mask, requests):
        if any("boom" in r.prompts for r in requests):
            raise RuntimeError("boom broke")
        return real(self, input_ids, attention_mask, requests)

    monkeypatch.setattr(TokenLoop, "add", fails_on_boom)  # the request's prefill
    got, worker = _worker_run(model, tokenizer, ["fine", "boom", "also fine"])
    assert [type(x) for x in got["boom"]] == [RuntimeError, object]
    assert worker.state.largest_batch == 2  # the two good ones were decoded together
    for prompt in ("fine", "also fine"):
        chunks = got[prompt][:-1]
        assert chunks and not any(isinstance(x, Exception) for x in chunks)
        assert "".join(c.text for c in chunks) == expected(model, tokenizer, prompt, 5).text


def test_a_failed_forward_fails_the_batch_not_those_done_and_the_worker_goes_on(
    model, tokenizer, monkeypatch
):
    real, steps = token_loop.last_logits, []

    def second_step_fails(model, input_ids, *args, **kwargs):
        if input_ids.size(1) == 1:  # a decode step (the prompts are longer)
            steps.append(input_ids.size(0))
            if len(steps) == 2:  # "short" has just drawn its last token; "long" goes on
                raise RuntimeError("out of memory")
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(token_loop, "last_logits", second_step_fails)
    short, long = "the short one", "the long one"
    got, worker = _worker_run(model, tokenizer, [short, long], {short: 2, long: 5})
    assert steps == [2, 1]  # both decoded together, then "long" alone
    assert not any(isinstance(x, Exception) for x in got[short])  # it finished: not failed
    assert got[short][-2].finish_reason == "length" and got[short][-1] is END
    assert isinstance(got[long][-2], RuntimeError) and "out of memory" in str(got[long][-2])
    monkeypatch.setattr(token_loop, "last_logits", real)
    later, _ = _worker_run(model, tokenizer, ["three"], worker=worker)  # the same worker
    assert "".join(c.text for c in later["three"][:-1]) == expected(model, tokenizer, "three", 5).text


def test_a_request_whose_draw_fails_fails_alone(model, tokenizer, monkeypatch):
    real = token_loop.sample_next

    def nan_for_seed_13(logits, opts, *args):
        if opts.seed == 13:  # as if its logits were NaN
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, opts, *args)

    monkeypatch.setattr(token_loop, "sample_next", nan_for_seed_13)
    state = SimpleNamespace(model=model, tokenizer=tokenizer, cancelled=0, largest_batch=0)
    worker = Batcher(state)
    got: dict[str, list] = {"good": [], "bad": []}
    with worker.ready:
        for prompt, seed in (("good", 1), ("bad", 13)):
            request, _ = parse_request({"max_tokens": 6, "seed": seed}, [prompt], tokenizer, 128, 16)
            worker.submit(Job(request, got[prompt].append))
    wait_for(lambda: all(items and items[-1] is END for items in got.values()),
             "the worker did not finish both requests")
    assert [type(x) for x in got["bad"]] == [RuntimeError, object]
    good = got["good"][:-1]
    assert good and not any(isinstance(x, Exception) for x in good)
    want = generate(model, tokenizer, "good", 6, temperature=1.0, seed=1)[0].text
    assert "".join(c.text for c in good) == want


def test_a_cancelled_request_at_the_head_of_the_queue_blocks_nobody(model, tokenizer):
    state = SimpleNamespace(model=model, tokenizer=tokenizer, cancelled=0, largest_batch=0)
    worker = Batcher(state)
    log: list[tuple[str, object]] = []  # what each request received, in order
    long_prompt = "word " * 40  # "gone": 40 + 80 tokens fit alone, not beside "running"
    sizes = {"running": 100, "gone": 80, "small": 3}
    with worker.ready:
        for prompt, n in sizes.items():
            text = long_prompt if prompt == "gone" else prompt
            request, _ = parse_request({"temperature": 0, "max_tokens": n}, [text], tokenizer, 128,
                                       16)
            job = Job(request, lambda item, p=prompt: log.append((p, item)))
            job.cancelled = prompt == "gone"  # its client left while it waited
            worker.submit(job)
    wait_for(lambda: ("running", END) in log, "the requests did not finish")
    assert [item for p, item in log if p == "gone"] == [END] and state.cancelled == 1
    small_done = log.index(("small", END))
    assert sum(p == "running" for p, _ in log[:small_done]) <= 3  # beside it, not after it


def test_dtl_serve_refuses_a_taken_port_and_a_missing_model(tmp_path, capsys):
    from dtl.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--model", str(tmp_path), "--port", str(port)])
        assert code == 2 and "pick another --port" in capsys.readouterr().err
    code = main(["serve", "--model", str(tmp_path / "none"), "--port", str(port)])
    assert code == 2 and "no such model" in capsys.readouterr().err


def test_dtl_serve_threads_default_to_all_cores_but_one(capsys):
    from dtl.cli import main
    from dtl.cli.serve import serve_threads

    assert [serve_threads(None, n) for n in (1, 2, 16)] == [1, 1, 15]
    assert serve_threads(3, 2) == 3  # as asked
    assert main(["serve", "--model", "x", "--threads", "0"]) == 2
    assert "--threads 0: give at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------- the trained context
def test_requests_must_fit_the_context_the_model_trained_at(tokenizer):
    """A model with a 128-position table trained at 16 tokens: /v1/models says 16; a
    max_tokens that fits 128 but not 16 is cut to the room 16 leaves (finish_reason "length"),
    and a prompt that leaves no room is OpenAI's 400 context_length_exceeded."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=128, trained_seq_len=16)  # fmt: skip
    with LiveServer(create_app(TransformerLM(config).eval(), tokenizer, NAME)) as live:
        card = httpx.get(f"{live.url}/v1/models").json()["data"][0]
        assert card["context_length"] == card["max_model_len"] == 16
        assert card["max_seq_length"] == 128 and card["trained_seq_len"] == 16
        prompt = " ".join(["word"] * 12)  # 12 tokens
        assert len(tokenizer.encode(prompt)) == 12
        body = {"model": NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0}
        r = httpx.post(f"{live.url}/v1/completions", json=body)  # 22 > 16: cut to the room
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["usage"] == {"prompt_tokens": 12, "completion_tokens": 4,
                                     "total_tokens": 16}  # fmt: skip
        r = httpx.post(f"{live.url}/v1/completions", json={**body, "prompt": "word " * 16})
        assert r.status_code == 400  # a prompt that fills the context leaves no room
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        assert "16" in error["message"]
