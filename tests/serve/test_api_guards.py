"""The API against hostile and clumsy requests (issue 16): oversized bodies, slow
tokenizing, text that is no Unicode, malformed fields, foreign Host headers and content
types, the key's reach, and `dtl serve`'s flags. Each test starts its own server on a free
loopback port (test_api's `LiveServer`) and checks what a client sees."""

from __future__ import annotations

import threading

import httpx
import pytest
from test_api import NAME, LiveServer, expected, model, tokenizer  # noqa: F401 (fixtures)

from dtl.serve.api import create_app
from dtl.serve.guard import DEFAULT_MAX_BODY_BYTES, host_allowed

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def live(model, tokenizer):  # noqa: F811
    with LiveServer(create_app(model, tokenizer, NAME)) as server:
        yield server


def _post(url: str, body: bytes | str, headers=None, **kwargs) -> httpx.Response:
    return httpx.post(url, content=body, headers=headers or JSON, timeout=60, **kwargs)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


class SpyTokenizer:
    """The real tokenizer, but `encode` records each text's length, and a text equal to
    `gate` waits in `encode` until `release` is set (having set `entered`)."""

    def __init__(self, real, gate: str | None = None) -> None:
        self.real, self.gate, self.lengths = real, gate, []
        self.entered, self.release = threading.Event(), threading.Event()

    def encode(self, text: str) -> list[int]:
        self.lengths.append(len(text))
        if text == self.gate:
            self.entered.set()
            self.release.wait(30)
        return self.real.encode(text)

    def __getattr__(self, name):
        return getattr(self.real, name)


# ---------------------------------------------------------------------- item 1: large bodies
def test_a_body_over_the_limit_is_413_whether_or_not_it_states_its_length(live):
    big = b'{"prompt": "' + b"word " * (DEFAULT_MAX_BODY_BYTES // 5 + 1000) + b'", "max_tokens": 3}'
    error = _error(_post(f"{live.url}/v1/completions", big), 413)
    assert error["code"] == "request_too_large" and "--max-body-mb" in error["message"]

    def chunked():  # no Content-Length: the server counts as it reads
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    error = _error(_post(f"{live.url}/v1/completions", chunked()), 413)
    assert error["code"] == "request_too_large"
    small = _post(f"{live.url}/v1/completions",
                  (b'{"prompt": "Hi", "max_tokens": 2}'[i : i + 4] for i in range(0, 40, 4)))  # fmt: skip
    assert small.status_code == 200, small.text  # a chunked body under the limit is read whole
    assert _post(f"{live.url}/v1/completions", '{"prompt": "Hi", "max_tokens": 2}').is_success


def test_the_body_limit_is_configurable(model, tokenizer):  # noqa: F811
    with LiveServer(create_app(model, tokenizer, NAME, max_body_bytes=100)) as server:
        body = '{"prompt": "Hi", "max_tokens": 2, "stop": ["' + "x" * 60 + '"]}'
        _error(_post(f"{server.url}/v1/completions", body), 413)
        assert _post(f"{server.url}/v1/completions", '{"prompt": "Hi", "max_tokens": 2}').is_success



def _chat_body(size: int) -> bytes:
    """A chat request of about `size` bytes (one long user message)."""
    return b'{"messages": [{"role": "user", "content": "' + b"a" * size + b'"}]}'


def _urllib_post(url: str, body) -> tuple[int, dict]:
    """POST with the standard library (which sends its whole body before it reads, and asks
    for `Connection: close`): the status and the JSON it read."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers=JSON, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _openai_error(status: int, body: dict, expected: int) -> dict:
    assert status == expected, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_every_ordinary_client_reads_the_413_of_an_oversized_body(live):
    """An 8 MB chat request over the 4 MiB limit: urllib, requests and httpx each read the 413
    in OpenAI's shape. (Before, the 413 went out with the body unread and the connection was
    closed on it: the kernel reset it, and urllib, which sends everything before reading, got
    ConnectionResetError instead.) A chunked body over the limit is answered the same way."""
    import requests

    url = f"{live.url}/v1/chat/completions"
    body = _chat_body(8 << 20)
    for status, answer in (
        _urllib_post(url, body),
        _urllib_post(url, iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)])),
    ):
        assert _openai_error(status, answer, 413)["code"] == "request_too_large"
    answer = requests.post(url, data=body, headers=JSON, timeout=60)
    assert _openai_error(answer.status_code, answer.json(), 413)["code"] == "request_too_large"
    answer = httpx.post(url, content=body, headers=JSON, timeout=60)
    assert _openai_error(answer.status_code, answer.json(), 413)["code"] == "request_too_large"
    status, answer = _urllib_post(url, b'{"messages": [{"role": "user", "content": "Hi"}], '
                                       b'"max_tokens": 2}')  # fmt: skip
    assert status == 200 and answer["choices"]  # and the server still serves


def _raw_post_head(url: str, length: int, extra: str = "", part: bytes = b"") -> bytes:
    """Send a POST's head stating `length` bytes, then `part` of the body only, and return
    what the server answers (within 10 s) while the rest is never sent."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
                     f"{extra}\r\n".encode() + part)  # fmt: skip
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without answering: {answer!r}"
            answer += chunk
        return answer


def test_a_refused_body_is_not_read_past_the_bound_nor_asked_for(live):
    """The drain has a bound: a body that states more than DRAIN_BYTES is answered at once,
    with the body unsent (a client cannot make the server read gigabytes); and a client that
    waits for `100 Continue` gets the 413 instead, and is never asked for its body."""
    from dtl.serve.guard import DRAIN_BYTES

    answer = _raw_post_head(live.url, DRAIN_BYTES + 1, part=b"{" * 1000)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    answer = _raw_post_head(live.url, 8 << 20, extra="Expect: 100-continue\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer  # no "HTTP/1.1 100 Continue" first


def test_tokenizing_a_prompt_leaves_the_server_free_for_others(model, tokenizer):  # noqa: F811
    """While a request's prompt is being tokenized, /health answers: the tokenizer runs off
    the event loop. (Before, the event loop waited for it: a 10 MB prompt froze the server.)"""
    spy = SpyTokenizer(tokenizer, gate="a prompt that takes long to tokenize")
    with LiveServer(create_app(model, spy, NAME)) as server:
        result = {}
        body = {"prompt": spy.gate, "max_tokens": 2}
        post = threading.Thread(target=lambda: result.update(
            r=httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)))  # fmt: skip
        post.start()
        try:
            assert spy.entered.wait(30), "the prompt never reached the tokenizer"
            try:  # the tokenizer is still busy (it waits for `release`)
                health = httpx.get(f"{server.url}/health", timeout=10)
            except httpx.TimeoutException:
                pytest.fail("/health did not answer while a prompt was being tokenized")
            assert health.status_code == 200 and not spy.release.is_set()
        finally:
            spy.release.set()
            post.join(60)
        assert result["r"].status_code == 200, result["r"].text


def test_a_prompt_too_long_by_its_length_alone_is_refused_untokenized(model, tokenizer):  # noqa: F811
    spy = SpyTokenizer(tokenizer)
    with LiveServer(create_app(model, spy, NAME)) as server:
        spy.lengths.clear()
        prompt = "word " * 400_000  # 2 MB: under the body limit, far over a 128-token context
        error = _error(_post(f"{server.url}/v1/completions",
                             f'{{"prompt": "{prompt}", "max_tokens": 3}}'), 400)  # fmt: skip
        assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        assert "2,000,000 characters" in error["message"] and "128" in error["message"]
        assert max(spy.lengths, default=0) < 1000  # it was never tokenized
        chat = {"messages": [{"role": "user", "content": prompt}]}
        error = _error(httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60), 400)
        assert error["code"] == "context_length_exceeded"
        assert max(spy.lengths, default=0) < 1000
        # just under that length, it is tokenized and refused by its token count
        error = _error(httpx.post(f"{server.url}/v1/completions",
                                  json={"prompt": " ".join(["word"] * 300)}, timeout=60), 400)  # fmt: skip
        assert error["code"] == "context_length_exceeded" and "300 tokens" in error["message"]


# ---------------------------------------------------------------------- item 5: a tiny top_p
def test_a_tiny_top_p_answers_greedily_not_500(live, model, tokenizer):  # noqa: F811
    for top_p in (1e-46, 1e-300):
        r = httpx.post(f"{live.url}/v1/completions", timeout=60,
                       json={"prompt": "a", "max_tokens": 3, "top_p": top_p, "seed": 1})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected(model, tokenizer, "a", 3).text


# ---------------------------------------------------------------------- items 6, 12: bodies
def test_a_lone_surrogate_is_a_400_naming_the_field(live):
    error = _error(_post(f"{live.url}/v1/completions", '{"prompt": "caf\\ud800", "max_tokens": 2}'),
                   400)  # fmt: skip
    assert error["param"] == "prompt" and error["code"] == "invalid_text"
    assert "'prompt'" in error["message"] and "\\ud800" in error["message"]
    body = '{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\\udfff!"}]}'
    error = _error(_post(f"{live.url}/v1/chat/completions", body), 400)
    assert error["param"] == "messages" and "'messages[1].content'" in error["message"]
    error = _error(_post(f"{live.url}/v1/completions", '{"prompt": "a", "\\ud800": 1}'), 400)
    assert error["code"] == "invalid_text"
    # a proper pair (an emoji written as two escapes) is text
    r = _post(f"{live.url}/v1/completions", '{"prompt": "\\ud83d\\ude00", "max_tokens": 2}')
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("options", ['"yes"', "[1]", "3", '{"include_usage": "no"}'])
def test_stream_options_of_the_wrong_type_are_400(live, options):
    body = f'{{"prompt": "a", "max_tokens": 2, "stream": true, "stream_options": {options}}}'
    error = _error(_post(f"{live.url}/v1/completions", body), 400)
    assert error["param"] == "stream_options" and error["code"] == "invalid_type"
    error = _error(_post(f"{live.url}/v1/chat/completions",
                         body.replace('"prompt": "a"', '"messages": [{"role": "user", "content": "a"}]')),
                   400)  # fmt: skip
    assert error["param"] == "stream_options"
    error = _error(_post(f"{live.url}/v1/completions", '{"prompt": "a", "stream": "false"}'), 400)
    assert error["param"] == "stream"


def test_deeply_nested_json_and_huge_numbers_are_400(live):
    deep = '{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    error = _error(_post(f"{live.url}/v1/completions", deep), 400)
    assert error["code"] == "invalid_json" and "nests too deeply" in error["message"]
    huge = '{"prompt": "a", "max_tokens": ' + "9" * 5000 + "}"
    assert _error(_post(f"{live.url}/v1/completions", huge), 400)["code"] == "invalid_json"
    assert _error(_post(f"{live.url}/v1/completions", '{"prompt": "a", "top_p": NaN}'),
                  400)["code"] == "invalid_json"  # fmt: skip
    assert httpx.get(f"{live.url}/health").status_code == 200  # and the server is fine


# ---------------------------------------------------------------------- item 12: who may call
def test_a_foreign_host_header_is_refused(live):
    port = live.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"rebind.attacker.test:{port}", "localhost.evil.example"):
        for path in ("/v1/models", "/health", "/"):
            error = _error(httpx.get(live.url + path, headers={"Host": host}), 400)
            assert error["code"] == "invalid_host" and "--allowed-hosts" in error["message"]
        r = httpx.post(f"{live.url}/v1/completions", headers={"Host": host},
                       json={"prompt": "a", "max_tokens": 2})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", "[::1]:8000",
                 "192.168.1.20:8000"):  # fmt: skip
        assert httpx.get(f"{live.url}/v1/models", headers={"Host": host}).status_code == 200


def test_allowed_hosts_lets_a_name_through(model, tokenizer):  # noqa: F811
    app = create_app(model, tokenizer, NAME, allowed_hosts=["gpu-box.lan"])
    with LiveServer(app) as server:
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": "gpu-box.lan:80"}).is_success
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": "other.lan"}).status_code == 400
    assert host_allowed("anything.example", ["*"]) and host_allowed(None, [])


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])  # fmt: skip
def test_a_post_that_is_not_json_is_415(live, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = httpx.post(f"{live.url}/v1/completions", content=b'{"prompt": "a", "max_tokens": 2}',
                   headers=headers)  # fmt: skip
    error = _error(r, 415)
    assert "application/json" in error["message"]
    ok = _post(f"{live.url}/v1/completions", '{"prompt": "a", "max_tokens": 2}',
               headers={"Content-Type": "Application/JSON; charset=utf-8"})  # fmt: skip
    assert ok.status_code == 200


def test_the_key_guards_everything_but_the_page_and_health(model, tokenizer):  # noqa: F811
    with LiveServer(create_app(model, tokenizer, NAME, api_key="s3cret")) as server:
        keyed = {"Authorization": "Bearer s3cret"}
        for path in ("/openapi.json", "/docs", "/redoc", "/v1/models", "/no-such-route"):
            assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(f"{server.url}/openapi.json", headers=keyed).status_code == 200
        for path in ("/docs", "/redoc"):  # they would load scripts from a CDN: not served
            assert httpx.get(server.url + path, headers=keyed).status_code == 404
        for path in ("/", "/static/app.js", "/ask_defaults", "/favicon.ico"):
            assert httpx.get(server.url + path).status_code == 200, path
        # /health answers probes without the key, and names the model only to a keyed call
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{server.url}/health", headers=keyed).json() == {
            "status": "ok", "model": NAME}  # fmt: skip
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app(model, tokenizer, NAME, api_key="")


# ---------------------------------------------------------------------- dtl serve's flags
@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--api-key", ""], None, "--api-key is empty"),
        (["--api-key", "   "], None, "--api-key is empty"),
        ([], "", "DTL_API_KEY is empty"),
        (["--api-key", "k\u00e9y"], None, "printable ASCII"),
        (["--allowed-hosts", "http://box.lan"], None, "without scheme or port"),
        (["--max-body-mb", "0"], None, "--max-body-mb 0"),
        (["--max-body-mb", "nan"], None, "--max-body-mb nan"),
    ],
)
def test_dtl_serve_refuses_bad_settings_in_one_line(tmp_path, capsys, monkeypatch, args, env,
                                                    message):  # fmt: skip
    from dtl.cli import main

    monkeypatch.delenv("DTL_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("DTL_API_KEY", env)
    code = main(["serve", "--model", str(tmp_path / "none"), "--port", "8123", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_dtl_serve_takes_the_key_from_the_environment():
    from dtl.cli.serve import api_key_setting

    assert api_key_setting(None, None) is None  # no key anywhere: an open server
    assert api_key_setting(None, "from-env") == "from-env"
    assert api_key_setting("flag", "from-env") == "flag"  # the flag wins


def test_starlettes_test_client_still_works(model, tokenizer):  # noqa: F811
    """In-process tests (Host 'testserver', no network) pass the Host check: no browser there."""
    from fastapi.testclient import TestClient

    client = TestClient(create_app(model, tokenizer, NAME))
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", headers={"Host": "evil.example"}).status_code == 200
    assert client.post("/v1/completions", content=b"{}", headers={"Content-Type": "text/plain"}
                       ).status_code == 415  # the other checks still hold  # fmt: skip


def test_dtl_serve_flags_become_the_guards_settings():
    from dtl.cli.serve import allowed_hosts, max_body_bytes

    assert allowed_hosts("gpu-box.lan, other.lan", "0.0.0.0") == ["gpu-box.lan", "other.lan",
                                                                  "0.0.0.0"]  # fmt: skip
    assert allowed_hosts("", "my-host.lan") == ["my-host.lan"]  # --host by name: allowed
    assert max_body_bytes(None) == DEFAULT_MAX_BODY_BYTES == 4 * 1024 * 1024
    assert max_body_bytes(0.5) == 512 * 1024
