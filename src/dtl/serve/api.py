"""An OpenAI-compatible HTTP API over one loaded model (FastAPI).

    GET  /health                 {"status": "ok", "model": NAME} (open to probes; with a key
                                 set, the model is named only to a keyed call)
    GET  /v1/models              OpenAI's model list, plus "parameters", "context_length" (the
                                 tokens it trained at, which requests must fit; vLLM's
                                 "max_model_len" too), "max_seq_length" (its position table)
                                 and "dtype" (fp32, bf16 or int8: `dtl serve --dtype`)
    POST /v1/completions         prompt -> text; `stream: true` sends server-sent events
    POST /v1/chat/completions    messages -> the Q&A template (the last user message is the
                                 question, earlier user/assistant pairs come before it); the
                                 answer ends at end-of-text or at the template's next
                                 "\nQuestion:" / "\nAnswer:" (`qa_stops`), never shown
    GET  /ask_defaults           the settings `dtl ask` starts from, as body fields
                                 (the page's Ask tab reads them; public, like the page)
    POST /tokenize, /detokenize, GET /tokenizer_info
                                 the tokenizer in vLLM's shapes (`dtl.serve.tokenize`)

Completions take `logprobs: N` and `echo` (the prompt's tokens scored), chat `logprobs` and
`top_logprobs`; the figures go out in OpenAI's shapes (`dtl.serve.logprobs`).

Every request first passes `dtl.serve.guard` (its Host, a JSON content type, the body limit),
then the API key (everything but the page's files and /health needs it when one is set).
A body becomes one `Request` (`dtl.serve.wire`: OpenAI's parameters, checked, into one
`SamplingOptions`; mistakes come back as 400 in OpenAI's error shape), which the one
generation thread (`dtl.serve.scheduler`) batches continuously with the others. Its pieces
come back here and go out as one JSON response or as server-sent events. A request whose
client goes away (streamed or not) is dropped from the batch at its next token.

>>> app = create_app(model, tokenizer, "tiny")
>>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import aclosing

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dtl.data.qa import qa_stops
from dtl.generate.batch import StreamChunk
from dtl.generate.decode import plan_if_fast
from dtl.generate.loop import Request
from dtl.model.dtype import inference_dtype_of
from dtl.serve.guard import DEFAULT_MAX_BODY_BYTES, RequestGuard
from dtl.serve.logprobs import chat_logprobs, completion_logprobs
from dtl.serve.page import add_page_routes
from dtl.serve.scheduler import END, Batcher, Job
from dtl.serve.tokenize import add_tokenizer_routes
from dtl.serve.wire import (
    ApiError,
    chat_prompt,
    check_model,
    completion_prompts,
    json_body,
    longest_token_bytes,
    parse_request,
)

__all__ = ["ApiError", "chat_prompt", "create_app"]


def create_app(
    model, tokenizer, model_name: str, api_key: str | None = None,
    allowed_hosts: Iterable[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:  # fmt: skip
    """The FastAPI app serving `model` (see the module docs), and the web page at `/`.

    With `api_key`, every route but the page's files and /health needs it. `allowed_hosts`
    and `max_body_bytes` are what `dtl.serve.guard` lets through."""
    if api_key is not None and not api_key:
        raise ValueError("api_key is empty: give a key, or None to serve without one")
    app = FastAPI(title="DTL", description="OpenAI-compatible API of a DTL model",
                  docs_url=None, redoc_url=None)  # both load scripts from a CDN
    model.eval()  # no dropout while serving
    if (plan := plan_if_fast(model)) is not None:  # lay the weights out now, not on the
        plan.for_rows(2)  # first request (~0.3 s)
    app.state.model, app.state.tokenizer, app.state.model_name = model, tokenizer, model_name
    app.state.cancelled = 0  # requests stopped early because their client went away
    app.state.largest_batch = 0  # the most rows decoded together so far
    app.state.batcher = Batcher(app.state)
    _add_auth_and_errors(app, api_key)
    _add_model_routes(app, model, model_name)
    _add_generation_routes(app, model_name)
    add_tokenizer_routes(app)
    add_page_routes(app)
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)
    longest_token_bytes(tokenizer)  # now, not on the first request
    return app


def _add_auth_and_errors(app: FastAPI, api_key: str | None) -> None:
    @app.middleware("http")
    async def check_key(request: HttpRequest, call_next):
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        request.scope["dtl_keyed"] = not api_key or secrets.compare_digest(
            given.encode(), api_key.encode()
        )
        if api_key and _needs_key(request.url.path):
            if not request.scope["dtl_keyed"]:
                return ApiError(
                    "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                    status=401,
                ).response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request: HttpRequest, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: HttpRequest, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return ApiError(str(err.detail), status=err.status_code, kind=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(_request: HttpRequest, err: Exception):
        return ApiError(f"internal error: {err}", status=500, kind="server_error").response()


def _add_model_routes(app: FastAPI, model, model_name: str) -> None:
    card = _model_card(model_name, int(time.time()), model.num_parameters(), model.config)
    card["dtype"] = inference_dtype_of(model)  # the format it runs in (`--dtype`)

    @app.get("/health")
    async def health(http: HttpRequest):  # open to probes; the model's name needs the key
        return {"status": "ok", "model": model_name} if http.scope.get("dtl_keyed") else {
            "status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str):
        if name != model_name:
            raise ApiError(
                f"model {name!r} not found; this server has {model_name!r}",
                "model",
                "model_not_found",
                status=404,
            )
        return card


def _add_generation_routes(app: FastAPI, model_name: str) -> None:
    state = app.state
    context = state.model.config.context

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await json_body(http)
        check_model(body, model_name)
        request, used = await run_in_threadpool(  # tokenizing: off the event loop
            parse_request, body, completion_prompts(body), state.tokenizer, context, 16
        )
        return await _respond(http, state, body, request, used, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await json_body(http)
        check_model(body, model_name)
        prompt = chat_prompt(body.get("messages"))
        request, used = await run_in_threadpool(  # tokenizing: off the event loop
            parse_request, body, [prompt], state.tokenizer, context, None, qa_stops()
        )
        return await _respond(http, state, body, request, used, "chat.completion", "chatcmpl")


async def _respond(
    http, state, body: dict, request: Request, prompt_tokens: int, kind: str, prefix: str
):
    """The response to a parsed request: streamed as server-sent events, or whole."""
    meta = {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": state.model_name,
    }
    tidy: Callable[[str], str] = str.lstrip if kind == "chat.completion" else _same
    job, queue = _queued_job(request)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = _sse(state.batcher, job, queue, prompt_tokens, meta, kind, tidy, include_usage)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    chunks = []
    async with aclosing(_submit(state.batcher, job, queue, http)) as items:
        async for item in items:  # closed on the way out: its disconnect watch ends too
            if isinstance(item, Exception):
                raise item
            chunks.append(item)
    if job.cancelled:  # the client went away; nobody reads this
        return ApiError(
            "the client closed the request", code="client_closed", status=499
        ).response()
    return _full_response(request, prompt_tokens, chunks, meta, kind, tidy, state.tokenizer)


def _same(text: str) -> str:
    return text


PUBLIC_PATHS = ("/", "/favicon.ico", "/ask_defaults", "/health")


def _needs_key(path: str) -> bool:
    """Everything needs the key (the API, /openapi.json, any route added later) but the page
    and its static files, which hold no data and ask the user for the key, and /health, which
    load balancers and probes call without one (it names the model only to a keyed call)."""
    return path not in PUBLIC_PATHS and not path.startswith("/static/")


def _model_card(name: str, created: int, n_params: int, config) -> dict:
    """OpenAI's model object, plus the context a request must fit (`context_length`, and
    vLLM's `max_model_len`) and what it comes from: the tokens per row the model trained at
    (`trained_seq_len`; `base_seq_len` is its source's when it was fine-tuned from another
    model), else, for a model saved before that was recorded, `max_seq_length`."""
    return {"id": name, "object": "model", "created": created, "owned_by": "dtl",
            "parameters": n_params, "context_length": config.context,
            "max_model_len": config.context, "max_seq_length": config.max_seq_length,
            "trained_seq_len": config.trained_seq_len,
            "base_seq_len": config.base_seq_len}  # fmt: skip


def _queued_job(request: Request) -> tuple[Job, asyncio.Queue]:
    """The server's record of `request`: its pieces, sent on the generation thread, land in
    the returned queue of the running event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    return Job(request, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)), queue


async def _submit(
    batcher: Batcher, job: Job, queue: asyncio.Queue, http: HttpRequest | None = None
):
    """Hand `job` (and its `queue`, from `_queued_job`) to the generation thread; yield its
    chunks (or an Exception) as they come. Given the `http` request, stop (marking the job
    cancelled, so the worker drops it at its next step) when its client disconnects: the
    body has been read, so the next ASGI message is the disconnect (`is_disconnected()`
    cannot see it through the HTTP middleware)."""
    batcher.submit(job)
    getter = asyncio.ensure_future(queue.get())
    watcher = asyncio.ensure_future(_disconnected(http)) if http is not None else None
    try:
        while True:
            waiting = {getter} if watcher is None else {getter, watcher}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the client left
                job.cancelled = True
                return
            item = getter.result()
            if item is END:
                return
            yield item
            getter = asyncio.ensure_future(queue.get())
    finally:
        getter.cancel()
        if watcher is not None:
            watcher.cancel()


async def _disconnected(request: HttpRequest) -> None:
    """Return once the client of `request` (whose body is read) has disconnected."""
    while not await request.is_disconnected():
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _full_response(
    request: Request,
    prompt_tokens: int,
    chunks: list[StreamChunk],
    meta: dict,
    kind: str,
    tidy,
    tokenizer,
) -> dict:
    rows = len(request.prompts)
    texts = [""] * rows
    finish: list[str | None] = ["length" if request.score_only else None] * rows
    drawn: list[list] = [[] for _ in range(rows)]  # each row's TokenLogprobs, when asked for
    used = 0
    for chunk in chunks:
        texts[chunk.index] += chunk.text
        drawn[chunk.index] += chunk.logprobs or []
        if chunk.finish_reason is not None:
            finish[chunk.index] = chunk.finish_reason
            used += len(chunk.token_ids)
    wanted = request.options.logprobs is not None
    choices = []
    for i, (text, reason) in enumerate(zip(texts, finish, strict=True)):
        if kind == "chat.completion":
            message = {"role": "assistant", "content": tidy(text)}
            logprobs = chat_logprobs(tokenizer, drawn[i]) if wanted else None
            choices.append({"index": i, "message": message, "finish_reason": reason,
                            "logprobs": logprobs})  # fmt: skip
            continue
        entries = drawn[i]
        if request.echo:  # the prompt is part of the text, its tokens part of the figures
            text = request.prompts[i] + text
            entries = (request.prompt_logprobs or [[]] * rows)[i] + entries
        logprobs = None
        if wanted:
            logprobs = completion_logprobs(tokenizer, entries, request.prompt_ids[i])[0]
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
    return {**meta, "object": kind, "choices": choices, "usage": _usage(prompt_tokens, used)}


async def _sse(
    batcher: Batcher, job: Job, queue, prompt_tokens: int, meta, kind, tidy, include_usage
):
    """Server-sent events: OpenAI's chunk objects, then `data: [DONE]`."""
    request = job.request
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"
    started = [False] * len(request.prompts)  # chat: whether a row's leading space is gone
    offsets = [0] * len(request.prompts)  # completions' logprobs: where the next token starts
    tokenizer = batcher.state.tokenizer
    used = 0
    try:
        if chat:
            for i in range(len(request.prompts)):
                first = {"index": i, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None, "logprobs": None}  # fmt: skip
                yield _event({**meta, "object": obj, "choices": [first]})
        async for item in _submit(batcher, job, queue):
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
            if not text and item.finish_reason is None and not item.logprobs:
                continue
            logprobs = None
            if chat:
                if item.logprobs is not None:
                    logprobs = chat_logprobs(tokenizer, item.logprobs)
                delta = {"content": text} if text else {}
                choice = {"index": item.index, "delta": delta,
                          "finish_reason": item.finish_reason, "logprobs": logprobs}  # fmt: skip
            else:
                if item.logprobs is not None:  # offsets run on through the row's text
                    logprobs, offsets[item.index] = completion_logprobs(
                        tokenizer, item.logprobs, offset=offsets[item.index]
                    )
                choice = {"index": item.index, "text": text, "logprobs": logprobs,
                          "finish_reason": item.finish_reason}  # fmt: skip
            yield _event({**meta, "object": obj, "choices": [choice]})
        if include_usage:
            yield _event(
                {**meta, "object": obj, "choices": [], "usage": _usage(prompt_tokens, used)}
            )
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): the worker drops its rows next step
        job.cancelled = True


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
