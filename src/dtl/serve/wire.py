"""OpenAI's wire format, the request side: a JSON body in, one `Request` out (or an
`ApiError`, sent back as OpenAI's error object with a 400).

Requests take OpenAI's `max_tokens`, `temperature` (0..2), `top_p`, `stop`, `seed`, `n`,
`presence_penalty`, `frequency_penalty`, `logit_bias` and `logprobs` (completions: 0..5 top
alternatives; chat: `logprobs: true` and `top_logprobs` 0..20), plus the extensions `top_k`,
`repetition_penalty` and `no_repeat_ngram_size`, all gathered into the request's one
`SamplingOptions`; completions also take `echo` (the prompt's tokens scored, with
`max_tokens: 0` for nothing more) and prompts as token ids. A `max_tokens` beyond the room
the longest prompt leaves in the context is cut to that room, and a prompt that leaves none is
a 400: `dtl.generate.context.fit_context`, the rule every path follows, with `truncate=False`
(the server never drops prompt tokens; see `_max_tokens` for why it cuts). Any other
field is a 400 that names it (`dtl.serve.params`). A request makes at most
MAX_REQUEST_ROWS (64) rows: its prompts times `n`. Everything is checked here, before the
request is queued, so none should fail in the worker.

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
from dtl.generate.context import fit_context
from dtl.generate.loop import Request
from dtl.generate.sampling import SamplingOptions
from dtl.serve.params import field_problem

MAX_N = 16  # choices per request
MAX_REQUEST_ROWS = 64  # prompts x n per request: one request never makes a giant batch
MAX_STOP = 16  # stop strings per request: OpenAI takes 4, but lm-evaluation-harness sends
# a task's own (some have 4 or 5) plus the end-of-text string, and vLLM takes any number
CHAT_DEFAULT_MAX_TOKENS = 128
MAX_LOGPROBS = 5  # completions' `logprobs`, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs`, as OpenAI allows


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


def completion_prompts(body: dict) -> list[str | list[int]]:
    """The prompts of a completions body: a string, a list of strings, a list of token ids,
    or a list of such lists (as OpenAI and vLLM take them)."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(_is_id(t) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt):
            return prompt
    raise ApiError("'prompt' must be a string, a non-empty list of strings, a non-empty list "
                   "of token ids, or a list of such lists", "prompt")  # fmt: skip


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_ids(tokenizer, prompts: list[str | list[int]]) -> list[list[int]]:
    """Token ids of each prompt: strings encoded, id lists checked against the vocabulary."""
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(encode_prompts(tokenizer, texts))
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(next(encoded))
            continue
        bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ApiError(f"token id {bad[0]} in 'prompt' is outside the vocabulary "
                           f"(0..{tokenizer.vocab_size - 1})", "prompt", "invalid_value")  # fmt: skip
        out.append(list(p))
    return out


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
    prompts: list[str | list[int]],
    tokenizer,
    context: int,
    default_max_tokens: int | None,
    stop_first: tuple[str, ...] = (),
    chat: bool | None = None,
) -> tuple[Request, int]:
    """The `Request` a body asks for (its prompts, each `n` times, and its options, with the
    stop strings `stop_first` before the body's), and its prompt tokens as usage counts them.
    `chat` (default: whether `default_max_tokens` is None, as chat's is) picks which fields
    the body may hold and how it asks for logprobs."""
    chat = default_max_tokens is None if chat is None else chat
    if (problem := field_problem(body, chat)) is not None:
        raise ApiError(*problem)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    if len(prompts) * n > MAX_REQUEST_ROWS:
        raise ApiError(
            f"{len(prompts)} prompts x n={n} is {len(prompts) * n} completions; a request may "
            f"ask for at most {MAX_REQUEST_ROWS} (prompts times n); split it into several",
            "prompt" if len(prompts) > 1 else "n",
            "too_many_completions",
        )
    check_stream(body)
    sampling = _sampling(body, tokenizer.vocab_size)
    logprobs = _chat_logprobs(body) if chat else _completion_logprobs(body)
    echo = _echo(body) if not chat else False
    stop = _stop_strings(body)
    texts_in = [p for p in prompts if isinstance(p, str)]  # token-id prompts are counted exactly
    check_prompt_chars(texts_in, tokenizer, context)  # before tokenizing megabytes of text
    prompt_ids = _prompt_ids(tokenizer, prompts)  # once: the batch reuses them
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
    longest = max(len(ids) for ids in prompt_ids)
    max_tokens = _max_tokens(body, default_max_tokens, echo)
    try:  # the one rule: cut to the room the longest prompt leaves; no room is a 400
        fit = fit_context(longest, max_tokens, context, truncate=False)
    except DtlError as err:
        raise ApiError(str(err), "prompt", "context_length_exceeded") from None
    try:  # built here, so a bad combination is a 400 and never fails in the worker
        options = SamplingOptions(**sampling, max_new_tokens=max(1, fit.max_new_tokens),
                                  stop=(*stop_first, *stop), logprobs=logprobs)  # fmt: skip
    except DtlError as err:
        raise ApiError(str(err), code="invalid_value") from None
    request = Request(
        [p for p in texts for _ in range(n)],
        options,
        prompt_ids=[ids for ids in prompt_ids for _ in range(n)],
        echo=echo,
        score_only=max_tokens == 0,
        fit=fit,
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


def _completion_logprobs(body: dict) -> int | None:
    """Completions' `logprobs`: how many top alternatives to list per token (0..5), or None."""
    return _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)


def _chat_logprobs(body: dict) -> int | None:
    """Chat's `logprobs: true` (+ `top_logprobs`, 0..20) as a count of top alternatives."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(f"'logprobs' must be true or false, got {wanted!r}", "logprobs",
                       "invalid_type")  # fmt: skip
    top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise ApiError("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return (top or 0) if wanted else None


def _echo(body: dict) -> bool:
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ApiError(f"'echo' must be true or false, got {echo!r}", "echo", "invalid_type")
    if echo and body.get("stream"):
        raise ApiError("'echo' is not supported with 'stream': true; send stream: false",
                       "echo", "unsupported_parameter")  # fmt: skip
    return bool(echo)


def _sampling(body: dict, vocab_size: int) -> dict:
    """temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size, the presence and
    frequency penalties, logit_bias and seed, checked, as SamplingOptions fields (`top_p` 0
    means greedy; 1 means no nucleus filter)."""
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
        "presence_penalty": float(_number(body, "presence_penalty", 0.0, -2.0, 2.0)),
        "frequency_penalty": float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0)),
        "logit_bias": _logit_bias(body, vocab_size),
    }


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: {"token id": bias in -100..100} (JSON keys are strings)."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError("'logit_bias' must be an object mapping token ids to biases",
                       "logit_bias", "invalid_type")  # fmt: skip
    pairs = []
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if token is None or token >= vocab_size:
            raise ApiError(f"'logit_bias' key {key!r} is not a token id (0..{vocab_size - 1})",
                           "logit_bias", "invalid_value")  # fmt: skip
        value = _number({"logit_bias": value}, "logit_bias", 0, -100, 100)
        pairs.append((token, float(value)))
    return tuple(pairs)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError("'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOP:
        raise ApiError(f"'stop' takes at most {MAX_STOP} strings", "stop")
    return stop


def _max_tokens(body: dict, default: int | None, echo: bool = False) -> int:
    """`max_tokens` (or `max_completion_tokens`); chat's default is CHAT_DEFAULT_MAX_TOKENS.
    0 (with `echo` only) scores the prompt and generates nothing; a prompt may then fill the
    whole context.

    What fits is `fit_context`'s: cut to the room the longest prompt leaves (the row then ends
    with finish_reason "length"), not refused. OpenAI ("This model's maximum context length is
    4097 tokens, however you requested 4116 tokens (3860 in your prompt; 256 for the
    completion)") and vLLM answer 400 when prompt + max_tokens passes the context, but
    lm-evaluation-harness sends one max_tokens (256 by default) whatever the context and gives
    up after three retries of a 400, so its generate_until tasks could not run on a 128- or
    256-token model. A prompt that leaves no room is still a 400."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None and default is None:
        max_tokens = CHAT_DEFAULT_MAX_TOKENS
    max_tokens = _number(
        {"max_tokens": max_tokens}, "max_tokens", default, 0, (1 << 31) - 1, integer=True
    )
    if max_tokens == 0 and not echo:
        raise ApiError("'max_tokens' 0 generates nothing: it is only allowed with 'echo': true "
                       "(to score the prompt); ask for at least 1", "max_tokens",
                       "invalid_value")  # fmt: skip
    return max_tokens
