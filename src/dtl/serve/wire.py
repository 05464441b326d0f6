"""OpenAI's wire format, the request side: a JSON body in, one `Request` out (or an
`ApiError`, sent back as OpenAI's error object with a 400).

Requests take OpenAI's `max_tokens`, `temperature` (0..2), `top_p`, `stop`, `seed`, `n`
(plus the extensions `top_k`, `repetition_penalty` and `no_repeat_ngram_size`), all gathered into the request's one
`SamplingOptions`. A request makes at most MAX_REQUEST_ROWS (64) rows: its prompts times `n`.
Everything is checked here, before the request is queued, so none should fail in the worker.

>>> chat_prompt([{"role": "user", "content": "Who wrote Hamlet?"}])
'Question: Who wrote Hamlet?\\nAnswer:'
"""

from __future__ import annotations

import json
import re

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from dtl.data.qa import format_qa, qa_prompt
from dtl.errors import DtlError
from dtl.generate.batch import encode_prompts
from dtl.generate.loop import Request
from dtl.generate.sampling import SamplingOptions

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


async def json_body(request: HttpRequest) -> dict:
    """The request's JSON object, checked to hold only text the tokenizer can read."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # json's C decoder nests with Python's recursion limit
        raise ApiError("request body nests too deeply to be read as JSON", code="invalid_json"
                       ) from None  # fmt: skip
    except ValueError as err:  # JSONDecodeError, bad UTF-8, an integer of > 4300 digits
        raise ApiError(f"request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object", code="invalid_json")
    _check_text(body)
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(body: dict) -> None:
    """Refuse a string holding a lone surrogate (JSON's "\\ud800" escape without its pair):
    it is no Unicode text, and no tokenizer can encode it. The message names where it is."""
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str) and (found := _SURROGATE.search(value)):
            field = where.split("[")[0].split(".")[0] or None
            raise ApiError(
                f"'{where}' holds a lone surrogate ({ascii(found.group())[1:-1]} at character "
                f"{found.start()}), which is not valid Unicode text; send UTF-8 text",
                field, "invalid_text",
            )  # fmt: skip
        if isinstance(value, dict):
            for key, item in value.items():
                name = _SURROGATE.sub("\ufffd", key)
                if name != key:
                    raise ApiError(f"a key in '{where or 'the body'}' holds a lone surrogate, "
                                   "which is not valid Unicode text; send UTF-8 text",
                                   where.split("[")[0].split(".")[0] or None, "invalid_text")
                stack.append((f"{where}.{name}" if where else name, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def check_model(body: dict, model_name: str) -> None:
    name = body.get("model")
    if name is not None and name != model_name:
        raise ApiError(
            f"model {name!r} does not exist on this server; it serves {model_name!r} "
            "(see GET /v1/models)", "model", "model_not_found",
        )  # fmt: skip


def completion_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise ApiError("'prompt' must be a string or a non-empty list of strings", "prompt")


def chat_prompt(messages) -> str:
    """OpenAI chat messages -> one Q&A prompt: earlier user/assistant turns become answered
    Q&A examples, the last user message the question. System messages are ignored."""
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


def parse_request(
    body: dict,
    prompts: list[str],
    tokenizer,
    context: int,
    default_max_tokens: int | None,
    stop_first: tuple[str, ...] = (),
) -> tuple[Request, int]:
    """The `Request` a body asks for (its prompts, each `n` times, and its options, with the
    stop strings `stop_first` before the body's), and its prompt tokens as usage counts them."""
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    if len(prompts) * n > MAX_REQUEST_ROWS:
        raise ApiError(
            f"{len(prompts)} prompts x n={n} is {len(prompts) * n} completions; a request may "
            f"ask for at most {MAX_REQUEST_ROWS} (prompts times n); split it into several",
            "prompt" if len(prompts) > 1 else "n",
            "too_many_completions",
        )
    check_stream(body)
    sampling = _sampling(body)
    stop = _stop_strings(body)
    check_prompt_chars(prompts, tokenizer, context)  # before tokenizing megabytes of text
    prompt_ids = encode_prompts(tokenizer, prompts)  # once: the batch reuses them
    longest = max(len(ids) for ids in prompt_ids)
    max_tokens = _max_tokens(body, longest, context, default_max_tokens)
    try:  # built here, so a bad combination is a 400 and never fails in the worker
        options = SamplingOptions(**sampling, max_new_tokens=max_tokens, stop=(*stop_first, *stop))
    except DtlError as err:
        raise ApiError(str(err), code="invalid_value") from None
    request = Request(
        [p for p in prompts for _ in range(n)],
        options,
        prompt_ids=[ids for ids in prompt_ids for _ in range(n)],
    )
    return request, sum(len(ids) for ids in prompt_ids)


def check_stream(body: dict) -> None:
    """`stream` is a boolean, `stream_options` an object whose `include_usage` is one."""
    if not isinstance(body.get("stream", False), (bool, type(None))):
        raise ApiError(f"'stream' must be true or false, got {body['stream']!r}", "stream",
                       "invalid_type")  # fmt: skip
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise ApiError(f"'stream_options' must be an object such as {{\"include_usage\": true}}, "
                       f"got {options!r:.60}", "stream_options", "invalid_type")  # fmt: skip
    if not isinstance(options.get("include_usage", False), (bool, type(None))):
        raise ApiError("'stream_options.include_usage' must be true or false",
                       "stream_options", "invalid_type")  # fmt: skip


def longest_token_bytes(tokenizer) -> int:
    """The most bytes any one token of `tokenizer` stands for (128 for GPT-2's): a text of
    more characters than context x this cannot fit the context, whatever its tokens."""
    key = id(tokenizer)
    if key not in _LONGEST:  # ~30 ms for GPT-2's 50,257 tokens, once per tokenizer
        longest = max(len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size))
        _LONGEST[key] = (tokenizer, longest)  # the tokenizer too: its id stays its own
    return _LONGEST[key][1]


_LONGEST: dict[int, tuple[object, int]] = {}


def check_prompt_chars(prompts: list[str], tokenizer, context: int) -> None:
    """Refuse, without tokenizing it, a prompt too long for the context by its length alone:
    each token stands for at most `longest_token_bytes` bytes, and a character is at least
    one byte, so a prompt of context x that many characters has at least `context` tokens."""
    longest = longest_token_bytes(tokenizer)
    for prompt in prompts:
        if len(prompt) >= context * longest:
            raise ApiError(
                f"the prompt is {len(prompt):,} characters, at least {len(prompt) // longest:,} "
                f"tokens, but the model's context is {context}; shorten the prompt",
                "prompt", "context_length_exceeded",
            )  # fmt: skip


def _sampling(body: dict) -> dict:
    """temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size and seed, checked,
    as SamplingOptions fields (`top_p` 0 means greedy; 1 means no nucleus filter)."""
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0.0:  # nothing but the top token: greedy, with no nucleus filter
        temperature = 0.0
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    return {
        "temperature": temperature,
        "top_k": _number(body, "top_k", None, 1, 1 << 30, integer=True),
        "top_p": None if top_p >= 1.0 or top_p == 0.0 else top_p,
        "repetition_penalty": float(_number(body, "repetition_penalty", 1.0, 0.01, 100.0)),
        "no_repeat_ngram_size": _number(body, "no_repeat_ngram_size", 0, 0, 64, integer=True),
        "seed": None if seed is None else seed % (1 << 63),
    }


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise ApiError(f"'stop' takes at most {MAX_STOP} strings", "stop")
    return stop


def _max_tokens(body: dict, longest: int, context: int, default: int | None) -> int:
    """`max_tokens` (or `max_completion_tokens`), checked against the context the prompt
    leaves; chat's default is CHAT_DEFAULT_MAX_TOKENS, or what the context leaves."""
    if longest >= context:
        raise ApiError(
            f"the prompt is {longest} tokens but the model's context is {context}; "
            "shorten the prompt",
            "prompt",
            "context_length_exceeded",
        )
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None and default is None:
        max_tokens = min(CHAT_DEFAULT_MAX_TOKENS, context - longest)
    max_tokens = _number(
        {"max_tokens": max_tokens}, "max_tokens", default, 1, context - 1, integer=True
    )
    if longest + max_tokens > context:
        raise ApiError(
            f"this model's context is {context} tokens, but the prompt ({longest} tokens) plus "
            f"max_tokens ({max_tokens}) is {longest + max_tokens}; lower max_tokens or shorten "
            "the prompt",
            "max_tokens",
            "context_length_exceeded",
        )
    return max_tokens
