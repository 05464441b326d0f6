"""The web page at `/`: its files, and the page itself in a real browser against `dtl serve`.

The browser tests drive Debian's Chromium (/usr/bin/chromium, never a downloaded browser)
through Playwright against real `dtl serve` subprocesses on loopback ports, one open and one
with --api-key, serving a tiny random model with the GPT-2 tokenizer. What the page shows is
checked against the same server's answers fetched with the `openai` client (temperature 0, so
both are the greedy continuation), never against the page's own output.

Each state is saved as a screenshot under test-artifacts/web/.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from testkit import PROJECT_ROOT, shared_path

from dtl.generate.sampling import ASK_DEFAULTS
from dtl.serve.page import STATIC_DIR, add_page_routes

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = PROJECT_ROOT / "test-artifacts" / "web"
MODEL_NAME = "tiny-web"
API_KEY = "s3cret-key"
# Words the random test model is biased towards, so what it writes is readable ASCII.
WORDS = "the river city people old bridge water north king town valley stone of and in was a"


# ---------------------------------------------------------------------- the page's files
@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    add_page_routes(app)
    return TestClient(app)


def test_root_serves_the_page_with_a_self_only_policy(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<script src="static/app.js"' in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy  # no inline script could sneak in


def test_every_file_the_page_links_is_served_with_its_type(client):
    html = client.get("/").text
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {"static/app.js", "static/style.css", "static/favicon.svg"} <= set(links)
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for link in links:
        response = client.get("/" + link)
        assert response.status_code == 200, link
        assert response.headers["content-type"].startswith(types[Path(link).suffix]), link


def test_nothing_outside_the_static_folder_is_served(client):
    for path in ("/static/page.py", "/static/..%2fpage.py", "/static/.hidden", "/static/x.js"):
        assert client.get(path).status_code == 404, path
    assert client.get("/static/%2e%2e/page.py").status_code == 404


def test_the_page_loads_nothing_from_elsewhere():
    # Offline means no CDN, no web fonts, no external script: no absolute URL anywhere.
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        found = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text, flags=re.I)
        found = [u for u in found if u != "http://www.w3.org/2000/svg"]  # SVG's namespace name
        assert not found, f"{path.name} refers to {found}"
        assert "@import" not in text and "@font-face" not in text, path.name


# ---------------------------------------------------------------------- servers and browser
def _need_chromium() -> None:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model with the GPT-2 tokenizer, biased towards a few English words."""
    import torch

    from dtl import ModelConfig, TransformerLM
    from dtl.tokenizer import load_tokenizer

    _need_chromium()
    tokenizer = load_tokenizer("gpt2", gpt2_dir=shared_path("gpt2"))
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=96, n_heads=2, n_layers=4,
                         d_ff=192, max_seq_length=1024, dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = TransformerLM(config)
    ids = sorted({tokenizer.encode(" " + w)[0] for w in WORDS.split()})
    with torch.no_grad():  # these words win, and which one depends on the context
        model.head.weight[ids] = torch.randn(len(ids), config.d_model)
        model.head.bias[ids] += 20.0
    directory = tmp_path_factory.mktemp("web") / MODEL_NAME
    model.save_pretrained(directory)
    tokenizer.save(directory)
    (directory / "num_parameters").write_text(str(model.num_parameters()))
    return directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(model_dir: Path, api_key: str | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "dtl", "serve", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if api_key:
        command += ["--api-key", api_key]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DTL_GPT2_DIR": str(shared_path("gpt2"))}
    env.pop("DTL_API_KEY", None)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def _wait_until_up(process: subprocess.Popen, base: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dtl serve exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            if httpx.get(base + "/", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    pytest.fail(f"dtl serve did not answer at {base} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def servers(model_dir):
    """{"open": base URL, "keyed": base URL}: two `dtl serve` processes, started together."""
    started = {"open": _start_server(model_dir, None), "keyed": _start_server(model_dir, API_KEY)}
    try:
        for process, base in started.values():
            _wait_until_up(process, base)
        yield {name: base for name, (_, base) in started.items()}
    finally:
        for process, _ in started.values():
            process.terminate()
        for process, _ in started.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def browser(servers):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own storage), failing the test on any uncaught script error."""
    context = browser.new_context(viewport={"width": 1100, "height": 640})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.set_default_timeout(15_000)
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def _openai(base: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _set(page, element_id: str, value) -> None:
    """Set a settings control as a user would (its `input` event fires)."""
    page.evaluate(
        """([id, value]) => {
            const el = document.getElementById(id);
            el.value = value;
            el.dispatchEvent(new Event("input", { bubbles: true }));
        }""",
        [element_id, str(value)],
    )


def _open(page, base: str, mode: str = "ask") -> None:
    page.goto(f"{base}/#{mode}")
    page.wait_for_function("() => document.getElementById('model-params').textContent !== ''")


# The page's settings until the user changes them: `dtl ask`'s (GET /ask_defaults).
PENALTY = ASK_DEFAULTS.repetition_penalty


def _greedy_chat(base: str, question: str, max_tokens: int, top_k=50, top_p=1.0) -> str:
    reply = _openai(base).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens, temperature=0, top_p=top_p,
        extra_body={"top_k": top_k, "repetition_penalty": PENALTY},
    )  # fmt: skip
    return reply.choices[0].message.content


def _greedy_completion(base: str, prompt: str, max_tokens: int) -> str:
    reply = _openai(base).completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, top_p=1.0,
        extra_body={"top_k": 50, "repetition_penalty": PENALTY},
    )  # fmt: skip
    return reply.choices[0].text


ANSWER_TEXT = "document.getElementById('answer').textContent"


# ---------------------------------------------------------------------- the page in a browser
@pytest.mark.browser
def test_header_shows_the_model_and_its_parameter_count(page, servers, model_dir):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    _open(page, servers["open"])
    n = int((model_dir / "num_parameters").read_text())  # counted by torch, not the server
    assert page.text_content("#model-name") == MODEL_NAME
    assert page.text_content("#model-params") == f"{n / 1e6:.1f}M parameters"
    assert page.get_attribute("#model-params", "title") == f"{n:,} parameters"
    assert "context 1024 tokens" in page.text_content("#model-context")
    assert page.is_hidden("#key-bar")  # an open server asks for no key
    assert requests and all(url.startswith(servers["open"] + "/") for url in requests)


@pytest.mark.browser
def test_ask_streams_the_answer_in_several_updates(page, servers):
    question = "Who built the old bridge?"
    _open(page, servers["open"])
    _set(page, "temperature", 0)
    _set(page, "max-tokens", 120)
    # Record the answer's length at every DOM change the stream makes.
    page.evaluate(
        """() => {
            window.lengths = [];
            const answer = document.getElementById("answer");
            new MutationObserver(() => window.lengths.push(answer.textContent.length))
                .observe(answer, { childList: true, characterData: true, subtree: true });
        }"""
    )
    _set(page, "top-k", 7)
    _set(page, "top-p", 0.5)
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" else None)
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_function("() => document.getElementById('answer').dataset.state === 'done'")
    _shot(page, "ask-answer")
    assert sent == [
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}],
         "max_tokens": 120, "stream": True, "stream_options": {"include_usage": True},
         "temperature": 0, "top_p": 0.5, "top_k": 7,
         "repetition_penalty": PENALTY}
    ]  # fmt: skip

    lengths = [n for n in page.evaluate("window.lengths") if n > 0]
    assert len(set(lengths)) >= 3, f"the answer arrived in too few updates: {lengths}"
    assert lengths == sorted(lengths)  # it only ever grew
    assert page.text_content("#answer") == _greedy_chat(servers["open"], question, 120, 7, 0.5)
    assert page.text_content("#ask-status").startswith("Done")
    assert page.is_enabled("#ask-btn") and page.is_disabled("#stop-btn")


@pytest.mark.browser
def test_ask_tab_starts_from_dtl_asks_settings(page, servers):
    """Untouched settings send what `dtl ask` uses: its parser's defaults are the oracle."""
    from dtl.cli import build_parser

    ask = build_parser().parse_args(["ask", "--model", "m", "q"])
    _open(page, servers["open"])
    page.wait_for_function(
        "() => document.getElementById('repetition-penalty-out').textContent !== ''"
    )
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" else None)
    page.fill("#question", "Where is the river?")
    page.press("#question", "Enter")
    page.wait_for_function("() => document.getElementById('answer').dataset.state === 'done'")
    body = sent[0]
    assert body["temperature"] == ask.temperature == 0
    assert body["top_k"] == ask.top_k and body["max_tokens"] == ask.max_new_tokens
    assert body["repetition_penalty"] == ask.repetition_penalty > 1
    assert body["top_p"] == 1 and ask.top_p is None  # 1 = no nucleus filter
    assert body.get("no_repeat_ngram_size", 0) == ask.no_repeat_ngram
    assert page.text_content("#answer") == _greedy_chat(servers["open"], "Where is the river?",
                                                        ask.max_new_tokens)  # fmt: skip


@pytest.mark.browser
def test_ask_tab_takes_its_defaults_from_the_server_not_a_copy(page, servers):
    """Answer GET /ask_defaults with other values: the page's request must carry them."""
    other = {"temperature": 0, "top_k": 7, "top_p": 1.0, "repetition_penalty": 1.7,
             "no_repeat_ngram_size": 2, "max_tokens": 33, "stop": []}  # fmt: skip
    page.route("**/ask_defaults", lambda route: route.fulfill(json=other))
    _open(page, servers["open"])
    page.wait_for_function("() => document.getElementById('max-tokens').value === '33'")
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" else None)
    page.fill("#question", "Where is the river?")
    page.press("#question", "Enter")
    page.wait_for_function("() => document.getElementById('answer').dataset.state === 'done'")
    body = sent[0]
    assert (body["top_k"], body["repetition_penalty"], body["max_tokens"]) == (7, 1.7, 33)
    assert body["no_repeat_ngram_size"] == 2


@pytest.mark.browser
def test_stop_ends_the_stream_mid_answer(page, servers):
    question = "Where is the river?"
    aborted: list[str] = []
    page.on("requestfailed", lambda r: aborted.append(r.url))
    _open(page, servers["open"])
    _set(page, "temperature", 0)
    _set(page, "max-tokens", 300)
    page.fill("#question", question)
    page.click("#ask-btn")
    page.wait_for_function(f"() => {ANSWER_TEXT}.length > 20")
    page.click("#stop-btn")
    page.wait_for_function(
        "() => document.getElementById('ask-status').textContent.startsWith('Stopped')"
    )
    stopped = page.text_content("#answer")
    page.wait_for_timeout(600)
    assert page.text_content("#answer") == stopped  # nothing more arrives
    _shot(page, "ask-stopped")

    full = _greedy_chat(servers["open"], question, 300)
    assert full.startswith(stopped) and 20 < len(stopped) < len(full)
    assert any(url.endswith("/v1/chat/completions") for url in aborted)  # the fetch was cut
    assert page.is_enabled("#ask-btn") and page.is_disabled("#stop-btn")
    assert page.is_hidden("#error")


@pytest.mark.browser
def test_ghost_suggestion_appears_and_tab_accepts_it(page, servers):
    prompt = "The river"
    _open(page, servers["open"], mode="complete")
    _set(page, "temperature", 0)
    _set(page, "suggest-tokens", 8)
    page.locator("#editor").press_sequentially(prompt, delay=20)
    page.wait_for_selector("#editor-wrap[data-suggest='ready']")
    ghost = page.text_content("#ghost")
    _shot(page, "complete-ghost")

    assert ghost == _greedy_completion(servers["open"], prompt, 8)
    assert page.input_value("#editor") == prompt  # the ghost is not text yet
    colours = page.evaluate(
        """() => [getComputedStyle(document.getElementById("ghost")).color,
                  getComputedStyle(document.getElementById("mirror")).color,
                  getComputedStyle(document.getElementById("editor")).color]"""
    )
    assert colours[0] != colours[1]  # grey, unlike the text typed
    assert colours[2] == "rgba(0, 0, 0, 0)"  # the textarea's own text steps aside meanwhile

    word = re.match(r"\s*\S+", ghost).group(0)
    page.keyboard.press("ArrowRight")  # the next word only
    assert page.input_value("#editor") == prompt + word
    assert page.text_content("#ghost") == ghost[len(word) :]
    page.keyboard.press("Tab")  # all the rest
    assert page.input_value("#editor") == prompt + ghost
    _shot(page, "complete-accepted")

    # A new suggestion follows; typing on throws it away at once.
    page.wait_for_selector("#editor-wrap[data-suggest='ready']")
    page.keyboard.type("!")
    assert page.evaluate("document.getElementById('ghost')") is None
    assert page.input_value("#editor") == prompt + ghost + "!"


@pytest.mark.browser
def test_a_stale_suggestion_is_cancelled_when_the_text_changes(page, servers):
    aborted: list[str] = []
    page.on("requestfailed", lambda r: aborted.append(r.url))
    _open(page, servers["open"], mode="complete")
    _set(page, "temperature", 0)
    _set(page, "suggest-tokens", 600)  # long enough to be still streaming when we type on
    editor = page.locator("#editor")
    editor.press_sequentially("The", delay=10)
    page.wait_for_selector("#editor-wrap[data-suggest='loading']")
    editor.press_sequentially(" old", delay=10)
    _set(page, "suggest-tokens", 6)
    page.wait_for_selector("#editor-wrap[data-suggest='ready']")
    assert any(url.endswith("/v1/completions") for url in aborted)
    assert page.text_content("#ghost") == _greedy_completion(servers["open"], "The old", 6)
    page.keyboard.press("Escape")  # dismissed, the text left as it was
    assert page.evaluate("document.getElementById('ghost')") is None
    assert page.input_value("#editor") == "The old"


@pytest.mark.browser
def test_a_wrong_api_key_shows_the_error_and_the_right_one_works(page, servers):
    base = servers["keyed"]
    page.goto(base + "/")
    page.wait_for_selector("#key-bar", state="visible")
    assert "needs an API key" in page.text_content("#error-text")
    _shot(page, "api-key-needed")

    page.fill("#api-key", "not-the-key")
    page.click("#key-btn")
    page.wait_for_function(
        "() => document.getElementById('key-status').textContent === 'key rejected'"
    )
    message = page.text_content("#error-text")
    assert "rejected the API key (401)" in message and page.is_visible("#error")
    _shot(page, "api-key-wrong")

    page.fill("#api-key", API_KEY)
    page.click("#key-btn")
    page.wait_for_function("() => document.getElementById('model-params').textContent !== ''")
    assert page.is_hidden("#error")
    _set(page, "temperature", 0)
    _set(page, "max-tokens", 6)
    page.fill("#question", "Is the key sent?")
    page.click("#ask-btn")
    page.wait_for_function("() => document.getElementById('answer').dataset.state === 'done'")
    expected = _openai(base, API_KEY).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Is the key sent?"}],
        max_tokens=6, temperature=0, extra_body={"repetition_penalty": PENALTY},
    )  # fmt: skip
    assert page.text_content("#answer") == expected.choices[0].message.content


@pytest.mark.browser
def test_a_refused_request_shows_the_servers_reason(page, servers):
    _open(page, servers["open"])
    page.fill("#question", "word " * 1100)  # longer than the model's 1024-token context
    page.click("#ask-btn")
    page.wait_for_selector("#error", state="visible")
    message = page.text_content("#error-text")
    _shot(page, "error-400")
    assert message.startswith("The server refused the request (400)")
    assert "context" in message and "shorten the prompt" in message  # the server's own words
    assert page.is_enabled("#ask-btn") and page.is_disabled("#stop-btn")


@pytest.mark.browser
def test_a_server_that_is_gone_shows_a_message_not_a_hang(page, servers):
    _open(page, servers["open"])
    # What the browser sees when nothing listens on the port any more.
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    page.fill("#question", "Anyone there?")
    page.click("#ask-btn")
    page.wait_for_selector("#error", state="visible")
    _shot(page, "error-server-down")
    assert page.text_content("#error-text").startswith(
        f"Cannot reach the server at {servers['open']}"
    )
    assert page.get_attribute("#server-dot", "data-state") == "down"
    assert page.is_enabled("#ask-btn")


def _chat_chunk(delta: dict, finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]})


@pytest.mark.browser
def test_the_stream_reader_copes_with_other_servers_event_layouts(page, servers):
    # dtl serve ends lines with \n; other OpenAI-compatible servers (sse-starlette) use \r\n,
    # send `: ping` comments and a role-only first chunk. The page must read them all.
    events = [
        ": ping",
        _chat_chunk({"role": "assistant"}),
        _chat_chunk({"content": "Hello"}),
        _chat_chunk({"content": ", wor"}),
        _chat_chunk({"content": "ld"}),
        _chat_chunk({}, finish="stop"),
        "data: [DONE]",
        _chat_chunk({"content": " (after DONE: never shown)"}),
    ]
    body = "\r\n\r\n".join(events) + "\r\n\r\n"
    _open(page, servers["open"])
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    page.fill("#question", "Say hello")
    page.click("#ask-btn")
    page.wait_for_function("() => document.getElementById('answer').dataset.state === 'done'")
    assert page.text_content("#answer") == "Hello, world"
    assert page.text_content("#ask-status").startswith("Done: 3 tokens")

    # An error event in the middle of a stream ends it with the server's message.
    failing = "\n\n".join([_chat_chunk({"content": "Half"}),
                           'data: {"error": {"message": "generation failed: out of memory"}}'])  # fmt: skip
    page.unroute("**/v1/chat/completions")
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=failing),
    )
    page.click("#ask-btn")
    page.wait_for_selector("#error", state="visible")
    assert page.text_content("#error-text") == (
        "The server failed (500): generation failed: out of memory. Its terminal shows the details."
    )
    assert page.text_content("#answer") == "Half"
    assert page.is_enabled("#ask-btn")

    # A stream cut short (no finish_reason, no [DONE]) is not passed off as a whole answer.
    page.unroute("**/v1/chat/completions")
    cut = _chat_chunk({"content": "Cut"}) + "\n\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=cut),
    )
    page.click("#error-close")
    page.click("#ask-btn")
    page.wait_for_selector("#error", state="visible")
    assert page.text_content("#error-text").startswith(
        "The connection to the server was lost mid-answer (the stream ended before its last event)"
    )
    assert page.text_content("#answer") == "Cut"


@pytest.mark.browser
def test_the_done_line_counts_tokens_from_the_streams_usage(page, servers):
    """A text piece is not a token (a stop-string prefix is held back, a character can take two
    tokens): the count is the server's usage, which the page asks the stream for."""
    question = "Who built the old bridge?"
    _open(page, servers["open"])
    _set(page, "temperature", 0)
    _set(page, "max-tokens", 9)
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_function("() => document.getElementById('answer').dataset.state === 'done'")
    reply = _openai(servers["open"]).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": question}], max_tokens=9,
        temperature=0, extra_body={"top_k": 50, "repetition_penalty": PENALTY},
    )  # fmt: skip
    used = reply.usage.completion_tokens
    assert page.text_content("#ask-status").startswith(f"Done: {used} tokens in ")
    # a server whose 3 pieces were 7 tokens: the page says 7
    events = [_chat_chunk({"content": "Hel"}), _chat_chunk({"content": "lo"}),
              _chat_chunk({"content": "!"}, finish="length"),
              'data: {"object": "chat.completion.chunk", "choices": [], "usage": '
              '{"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}',
              "data: [DONE]"]  # fmt: skip
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body="\n\n".join(events) + "\n\n"))  # fmt: skip
    page.click("#ask-btn")
    page.wait_for_function("() => document.getElementById('ask-status').textContent"
                           ".startsWith('Done')")  # fmt: skip
    assert page.text_content("#ask-status").startswith("Done: 7 tokens in ")
    assert page.text_content("#ask-status").endswith("(reached max tokens)")


@pytest.mark.browser
def test_an_error_banner_goes_on_a_tab_switch_and_after_a_success(page, servers):
    _open(page, servers["open"])
    page.fill("#question", "word " * 1100)  # over the context: a 400
    page.click("#ask-btn")
    page.wait_for_selector("#error", state="visible")
    page.click("#tab-complete")
    assert page.is_hidden("#error")  # about the Ask tab's request, not this tab

    # in Complete: a refused suggestion, then one that works: the message goes
    refusal = {"error": {"message": "busy", "type": "invalid_request_error", "param": None,
                         "code": None}}  # fmt: skip
    page.route("**/v1/completions", lambda route: route.fulfill(status=400, json=refusal))
    _set(page, "temperature", 0)
    _set(page, "suggest-tokens", 4)
    page.locator("#editor").press_sequentially("The river", delay=10)
    page.wait_for_selector("#error", state="visible")
    assert "busy" in page.text_content("#error-text")
    page.unroute("**/v1/completions")
    page.locator("#editor").press_sequentially(" and", delay=10)
    page.wait_for_selector("#editor-wrap[data-suggest='ready']")
    assert page.is_hidden("#error")


@pytest.mark.browser
def test_earlier_answers_stay_listed_with_copy_buttons(browser, servers):
    context = browser.new_context(viewport={"width": 1100, "height": 900},
                                  permissions=["clipboard-read", "clipboard-write"])  # fmt: skip
    page = context.new_page()
    try:
        _open(page, servers["open"])
        _set(page, "temperature", 0)
        _set(page, "max-tokens", 8)
        questions = ["Where is the river?", "Who was the old king?", "What is <b>stone</b>?"]
        for question in questions:
            page.fill("#question", question)
            page.press("#question", "Enter")
            page.wait_for_function(
                "() => document.getElementById('answer').dataset.state === 'done'"
            )
        answers = [_greedy_chat(servers["open"], q, 8) for q in questions]
        assert page.text_content("#answer") == answers[2]
        items = page.locator("#history-list li")
        assert items.count() == 2  # the earlier two, newest first
        for i, k in enumerate([1, 0]):
            assert items.nth(i).locator(".q").text_content() == questions[k]
            assert items.nth(i).locator(".a").text_content() == answers[k]
        assert page.locator("#history-list b").count() == 0  # text, never parsed as HTML
        _shot(page, "ask-history")
        items.nth(1).locator("button.copy").click()
        assert page.evaluate("navigator.clipboard.readText()") == answers[0]
        assert items.nth(1).locator("button.copy").text_content() == "copied"
        page.click("#copy-answer")
        assert page.evaluate("navigator.clipboard.readText()") == answers[2]
    finally:
        context.close()


@pytest.mark.browser
@pytest.mark.parametrize("width", [320, 360, 412])
def test_on_a_phone_the_header_keeps_parameters_and_context_together(browser, servers, width):
    context = browser.new_context(viewport={"width": width, "height": 740}, is_mobile=True)
    page = context.new_page()
    try:
        _open(page, servers["open"])
        boxes = page.evaluate(
            """() => ["model-params", "model-context"].map(
                id => document.getElementById(id).getBoundingClientRect().top)"""
        )
        assert abs(boxes[0] - boxes[1]) < 2, f"'context' wrapped alone onto a line: {boxes}"
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # no side-scroll
        _shot(page, f"phone-header-{width}")
    finally:
        context.close()
