"""An OpenAI-compatible HTTP API over one loaded model (FastAPI).

    GET  /health                 {"status": "ok", "model": NAME}
    GET  /v1/models              OpenAI's model list, plus "parameters" and "max_seq_length"
    POST /v1/completions         prompt -> text; `stream: true` sends server-sent events
    POST /v1/chat/completions    messages -> the Q&A template (the last user message is the
                                 question, earlier user/assistant pairs come before it)

Requests take OpenAI's `max_tokens`, `temperature` (0..2), `top_p`, `stop`, `seed`, `n`
(plus the extensions `top_k` and `repetition_penalty`). A request makes at most
MAX_REQUEST_ROWS (64) rows: its prompts times `n`. Mistakes come back as 400 in OpenAI's
error shape `{"error": {"message", "type", "param", "code"}}`; every request is checked
(sampling options included) before it is queued, so none should fail inside the worker
(and one that does fails alone, see `Batcher`).

One model is shared by every request, so generation runs on a single worker thread that
batches continuously (`dtl.generate.batch`): a request joins the running batch between two
decode steps (so it waits one step, not a whole batch) and leaves it when it is done. Each
keeps its own settings and seeded generator (what a request gets does not depend on its
neighbours), and a request whose client goes away (streamed or not) is dropped from the
batch at its next token; one still waiting never holds up those behind it.

>>> app = create_app(model, tokenizer, "tiny")  # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dtl.data.qa import QA_STOP, format_qa, qa_prompt
from dtl.errors import DtlError
from dtl.generate import loop as gen
from dtl.generate.batch import ContinuousBatch, Join
from dtl.generate.decode import plan_if_fast
from dtl.generate.loop import StreamChunk

MAX_N = 16  # choices per request
MAX_REQUEST_ROWS = 64  # prompts x n per request: one request never makes a giant batch
MAX_STOP = 4  # stop strings per request, as OpenAI allows
CHAT_DEFAULT_MAX_TOKENS = 128


class ApiError(Exception):
    """A request mistake, sent back as OpenAI's error object."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = (
            message, param, code, status, kind,
        )  # fmt: skip

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


@dataclass
class Job:
    """One validated request: the rows to generate and how."""

    prompts: list[str]  # one per choice (each prompt repeated n times)
    prompt_tokens: int  # summed over the distinct prompts, as OpenAI counts usage
    longest: int  # the longest prompt's tokens (what a batch must make room for)
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    repetition_penalty: float
    stop: list[str]
    seed: int | None
    options: gen.SamplingOptions  # the above, checked when the request came in


def create_app(model, tokenizer, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` (see the module docs); the web page is added at `/`
    when `dtl.serve.page` is installed."""
    app = FastAPI(title="DTL", description="OpenAI-compatible API of a DTL model", docs_url=None)
    model.eval()  # no dropout while serving
    if (plan := plan_if_fast(model)) is not None:  # lay the weights out now, not on the
        plan.head_for(model, rows=2)  # first request (~0.3 s)
    app.state.model, app.state.tokenizer, app.state.model_name = model, tokenizer, model_name
    app.state.cancelled = 0  # streams stopped early because their client went away
    app.state.largest_batch = 0  # the most rows decoded together so far
    worker = Batcher(app.state)
    app.state.batcher = worker
    created = int(time.time())
    n_params = sum(p.numel() for p in model.parameters())
    context = model.config.max_seq_length

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and _needs_key(request.url.path):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return ApiError(
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key", status=401,
                ).response()  # fmt: skip
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return ApiError(str(err.detail), status=err.status_code, kind=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception):
        return ApiError(f"internal error: {err}", status=500, kind="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, created, n_params, context)]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str):
        if name != model_name:
            raise ApiError(f"model {name!r} not found; this server has {model_name!r}",
                           "model", "model_not_found", status=404)  # fmt: skip
        return _model_card(model_name, created, n_params, context)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        _check_model(body, model_name)
        prompts = _prompts(body)
        job = _job(body, prompts, tokenizer, context, default_max_tokens=16)
        return await _respond(request, body, job, "text_completion", "cmpl", lambda t: t)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        _check_model(body, model_name)
        prompt = chat_prompt(body.get("messages"))
        job = _job(body, [prompt], tokenizer, context, default_max_tokens=None)
        job.stop = [QA_STOP, *job.stop]
        return await _respond(request, body, job, "chat.completion", "chatcmpl", str.lstrip)

    async def _respond(request, body, job: Job, kind: str, prefix: str, tidy: Callable):
        meta = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_name}  # fmt: skip
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = _sse(request, worker, app.state, job, meta, kind, tidy, include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        chunks = []
        cancel = threading.Event()
        async with aclosing(_submit(worker, job, cancel, request)) as items:
            async for item in items:  # closed on the way out: its disconnect watch ends too
                if isinstance(item, Exception):
                    raise item
                chunks.append(item)
        if cancel.is_set():  # the client went away; nobody reads this
            return ApiError("the client closed the request", code="client_closed",
                            status=499).response()  # fmt: skip
        return _full_response(job, chunks, meta, kind, tidy)

    try:  # the web page, if the web engineer's module is here
        from dtl.serve.page import add_page_routes
    except ImportError:
        pass
    else:
        add_page_routes(app)
    return app


# ---------------------------------------------------------------------- request parsing
def _needs_key(path: str) -> bool:
    """The API needs the key; the page and its static files are public (they hold no data
    and ask the user for the key)."""
    return path.startswith("/v1") or path == "/health"


def _model_card(name: str, created: int, n_params: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "dtl",
            "parameters": n_params, "max_seq_length": context}  # fmt: skip


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(f"request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object", code="invalid_json")
    return body


def _check_model(body: dict, model_name: str) -> None:
    name = body.get("model")
    if name is not None and name != model_name:
        raise ApiError(
            f"model {name!r} does not exist on this server; it serves {model_name!r} "
            "(see GET /v1/models)", "model", "model_not_found",
        )  # fmt: skip


def _prompts(body: dict) -> list[str]:
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise ApiError("'prompt' must be a string or a non-empty list of strings", "prompt")


def chat_prompt(messages) -> str:
    """OpenAI chat messages -> one Q&A prompt: earlier user/assistant turns become answered
    Q&A examples, the last user message the question. System messages are ignored.

    >>> chat_prompt([{"role": "user", "content": "Who wrote Hamlet?"}])
    'Question: Who wrote Hamlet?\\nAnswer:'
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list of {role, content}", "messages")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(f"messages[{i}] must be an object with 'role' and 'content'",
                           "messages")  # fmt: skip
        role, content = message.get("role"), _message_text(message.get("content"), i)
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(f"messages[{i}] has unknown role {role!r}", "messages")
        if role in ("user", "assistant"):
            turns.append((role, content))
    if not turns or turns[-1][0] != "user":
        raise ApiError("the last message must come from the user (it is the question)",
                       "messages")  # fmt: skip
    history, question = turns[:-1], turns[-1][1]
    shots, pending = [], None
    for role, content in history:
        if role == "user":
            pending = content
        elif pending is not None:
            shots.append(format_qa(pending, content))
            pending = None
    return "\n".join([*shots, qa_prompt(question)])


def _message_text(content, i: int) -> str:
    """A message's text: a string, or OpenAI's list of parts ({"type": "text", "text"})."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError(f"messages[{i}].content must be a string or a list of text parts "
                   "(this model reads text only)", "messages")  # fmt: skip


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ApiError(f"'{name}' must be {kind}, got {value!r}", name, "invalid_type")
    if not lo <= value <= hi:
        raise ApiError(f"'{name}' must be between {lo} and {hi}, got {value}", name,
                       "invalid_value")  # fmt: skip
    return value


def _job(body: dict, prompts: list[str], tokenizer, context: int, default_max_tokens) -> Job:
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    if len(prompts) * n > MAX_REQUEST_ROWS:
        raise ApiError(
            f"{len(prompts)} prompts x n={n} is {len(prompts) * n} completions; a request may "
            f"ask for at most {MAX_REQUEST_ROWS} (prompts times n); split it into several",
            "prompt" if len(prompts) > 1 else "n", "too_many_completions",
        )  # fmt: skip
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0.0:  # nothing but the top token: greedy, with no nucleus filter
        temperature = 0.0
    top_p_option = None if top_p >= 1.0 or top_p == 0.0 else top_p
    top_k = _number(body, "top_k", None, 1, 1 << 30, integer=True)
    penalty = float(_number(body, "repetition_penalty", 1.0, 0.01, 100.0))
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise ApiError(f"'stop' takes at most {MAX_STOP} strings", "stop")
    lengths = gen.prompt_lengths(tokenizer, prompts)
    longest = max(lengths)
    if longest >= context:
        raise ApiError(
            f"the prompt is {longest} tokens but the model's context is {context}; "
            "shorten the prompt", "prompt", "context_length_exceeded",
        )  # fmt: skip
    limit = context - 1
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None and default_max_tokens is None:
        max_tokens = min(CHAT_DEFAULT_MAX_TOKENS, context - longest)
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, limit,
                         integer=True)  # fmt: skip
    if longest + max_tokens > context:
        raise ApiError(
            f"this model's context is {context} tokens, but the prompt ({longest} tokens) plus "
            f"max_tokens ({max_tokens}) is {longest + max_tokens}; lower max_tokens or shorten "
            "the prompt", "max_tokens", "context_length_exceeded",
        )  # fmt: skip
    seed = None if seed is None else seed % (1 << 63)
    try:  # built here, so a bad combination is a 400 and never fails in the worker
        options = gen.SamplingOptions(temperature, top_k, top_p_option, penalty, seed)
    except DtlError as err:
        raise ApiError(str(err), code="invalid_value") from None
    return Job(
        prompts=[p for p in prompts for _ in range(n)],
        prompt_tokens=sum(lengths),
        longest=longest,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p_option,
        top_k=top_k,
        repetition_penalty=penalty,
        stop=list(stop),
        seed=seed,
        options=options,
    )


# ---------------------------------------------------------------------- running jobs
MAX_BATCH_ROWS = 16
_END = object()  # a ticket's last item


@dataclass
class Ticket:
    """A job handed to the worker: where its chunks go and whether its client left."""

    job: Job
    send: Callable[[object], None]  # thread-safe: a StreamChunk, an Exception, or _END
    cancel: threading.Event
    left: int = 0  # rows not finished yet
    emitted: int = 0  # chunks sent so far
    ended: bool = False  # _END sent: nothing more goes out

    def emit(self, item) -> None:
        if self.ended:
            return
        if item is _END:
            self.ended = True
        elif isinstance(item, StreamChunk):
            self.emitted += 1
        self.send(item)

    def fail(self, err: Exception) -> None:
        self.emit(err)
        self.emit(_END)


class Batcher:
    """The one thread that generates for every request, by continuous batching
    (`dtl.generate.batch`): between two decode steps, waiting requests join the running batch
    (up to MAX_BATCH_ROWS rows that fit the context, first come first served) and finished
    or abandoned ones leave it. Each request keeps its own settings and seeded generator, so
    it gets what it would get alone, and none ever sees another's KV cache rows. A request
    whose own work fails (its prefill, its draw) fails alone; should the batch's forward
    fail, the requests in it hear of it, and the worker goes on with the next ones."""

    def __init__(self, state) -> None:
        self.state = state
        self.pending: deque[Ticket] = deque()
        self.batch = ContinuousBatch(state.model, state.tokenizer, MAX_BATCH_ROWS)
        self.tickets: dict[int, Ticket] = {}  # id(ticket) -> ticket, for those in the batch
        self.ready = threading.Condition()
        threading.Thread(target=self._loop, name="dtl-generate", daemon=True).start()

    @property
    def running(self) -> list[Ticket]:
        """The requests being decoded now (for tests and operators)."""
        tickets = [self.tickets.get(m.key) for m in list(self.batch.members)]
        return [t for t in tickets if t is not None]  # another thread may read mid-change

    def submit(self, ticket: Ticket) -> None:
        with self.ready:
            self.pending.append(ticket)
            self.ready.notify()

    def _next(self, joining: list[Ticket]) -> Ticket | None:
        """The first waiting ticket if it can join the batch now, beside those `joining` it
        already (waiting for one if nothing runs or joins)."""
        with self.ready:
            while not self.batch and not joining and not self.pending:
                self.ready.wait()
            while self.pending and self.pending[0].cancel.is_set():  # never queue behind
                self.state.cancelled += 1  # a request whose client has left
                self.pending.popleft().emit(_END)
            if not self.pending:
                return None
            jobs = [t.job for t in joining] + [self.pending[0].job]
            rows = sum(len(j.prompts) for j in jobs)
            if joining and self.batch.n_rows + rows > MAX_BATCH_ROWS:
                return None  # (one request alone may be larger, in an empty batch)
            longest = max(j.longest for j in jobs)
            if self.batch.fits(rows, longest, max(j.max_tokens for j in jobs)):
                return self.pending.popleft()
        return None

    def _admit(self, tickets: list[Ticket]) -> None:
        """Prefill `tickets` together and add them to the batch; if that fails, each alone,
        so that a request whose own prefill fails fails alone."""
        joins = [Join(id(t), t.job.prompts, t.job.max_tokens, t.job.options, t.job.stop)
                 for t in tickets]  # fmt: skip
        for t in tickets:
            t.left = len(t.job.prompts)
            self.tickets[id(t)] = t  # before it joins: `running` may look it up
        try:
            self.batch.add_many(joins)
            return
        except Exception as err:
            if len(tickets) == 1:
                del self.tickets[id(tickets[0])]
                tickets[0].fail(err)
                return
        for ticket, join in zip(tickets, joins, strict=True):
            try:
                self.batch.add_many([join])
            except Exception as err:  # this request's own failure: only it hears of it
                del self.tickets[id(ticket)]
                ticket.fail(err)

    def _loop(self) -> None:
        state = self.state
        while True:
            joining: list[Ticket] = []
            while (ticket := self._next(joining)) is not None:
                joining.append(ticket)
            if joining:
                self._admit(joining)
            state.largest_batch = max(state.largest_batch, self.batch.n_rows)
            for ticket in self.running:
                if ticket.cancel.is_set():  # the client left mid-generation
                    state.cancelled += 1
                    self.batch.drop(id(ticket))
                    self._end(ticket)
            if not self.batch:
                continue
            try:
                items = self.batch.step()  # a failed draw or forward comes back as an item
            except Exception as err:  # a bug of ours: nobody may be left waiting
                for ticket in list(self.tickets.values()):
                    ticket.fail(err)
                self.batch.clear()
                self.tickets.clear()
                continue
            for key, item in items:
                ticket = self.tickets[key]
                if isinstance(item, Exception):
                    ticket.fail(item)
                    self.tickets.pop(key, None)
                    continue
                ticket.emit(item)
                if item.finish_reason is not None:
                    ticket.left -= 1
                    if ticket.left == 0:
                        self._end(ticket)

    def _end(self, ticket: Ticket) -> None:
        ticket.emit(_END)
        self.tickets.pop(id(ticket), None)


async def _submit(worker: Batcher, job: Job, cancel: threading.Event, request=None):
    """Hand `job` to the worker; yield its chunks (or an Exception) as they come. Given the
    `request`, stop (setting `cancel`, so the worker drops the job at its next step) when its
    client disconnects: the body has been read, so the next ASGI message is the disconnect
    (`request.is_disconnected()` cannot see it through the HTTP middleware)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    worker.submit(Ticket(job, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                         cancel))  # fmt: skip
    getter = asyncio.ensure_future(queue.get())
    watcher = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    try:
        while True:
            waiting = {getter} if watcher is None else {getter, watcher}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the client left
                cancel.set()
                return
            item = getter.result()
            if item is _END:
                return
            yield item
            getter = asyncio.ensure_future(queue.get())
    finally:
        getter.cancel()
        if watcher is not None:
            watcher.cancel()


async def _disconnected(request: Request) -> None:
    """Return once the client of `request` (whose body is read) has disconnected."""
    while not await request.is_disconnected():
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}  # fmt: skip


def _full_response(job: Job, chunks: list[StreamChunk], meta: dict, kind: str, tidy) -> dict:
    texts = [""] * len(job.prompts)
    finish: list[str | None] = [None] * len(job.prompts)
    used = 0
    for chunk in chunks:
        texts[chunk.index] += chunk.text
        if chunk.finish_reason is not None:
            finish[chunk.index] = chunk.finish_reason
            used += len(chunk.token_ids)
    choices = []
    for i, (text, reason) in enumerate(zip(texts, finish, strict=True)):
        if kind == "chat.completion":
            message = {"role": "assistant", "content": tidy(text)}
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": None})  # fmt: skip
        else:
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
    return {**meta, "object": kind, "choices": choices, "usage": _usage(job, used)}


async def _sse(request, worker: Batcher, state, job: Job, meta, kind, tidy, include_usage):
    """Server-sent events: OpenAI's chunk objects, then `data: [DONE]`."""
    cancel = threading.Event()
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    started = [False] * len(job.prompts)  # chat: whether a row's leading space is gone
    used = 0
    try:
        if chat:
            for i in range(len(job.prompts)):
                first = {"index": i, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None, "logprobs": None}  # fmt: skip
                yield _event({**meta, "object": obj, "choices": [first]})
        async for item in _submit(worker, job, cancel):
            if isinstance(item, Exception):
                message = f"generation failed: {item}"
                yield _event({"error": {"message": message, "type": "server_error",
                                        "param": None, "code": None}})  # fmt: skip
                break
            text = item.text
            if chat and not started[item.index]:
                text = tidy(text)
                started[item.index] = bool(text)
            if item.finish_reason is not None:
                used += len(item.token_ids)
            if not text and item.finish_reason is None:
                continue
            if chat:
                delta = {"content": text} if text else {}
                choice = {"index": item.index, "delta": delta,
                          "finish_reason": item.finish_reason, "logprobs": None}  # fmt: skip
            else:
                choice = {"index": item.index, "text": text, "logprobs": None,
                          "finish_reason": item.finish_reason}  # fmt: skip
            yield _event({**meta, "object": obj, "choices": [choice]})
        if include_usage:
            yield _event({**meta, "object": obj, "choices": [], "usage": _usage(job, used)})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): the worker drops its rows next step
        cancel.set()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

