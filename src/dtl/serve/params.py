"""Which request fields the API takes: every field of OpenAI's completions and chat
completions bodies is either used, accepted as a no-op (it changes no output: `user`,
`metadata`, ...), or answered with a 400 that names it when it asks for something this server
does not do (`suffix`, `best_of` above `n`, tools, a JSON `response_format`, ...). A field
OpenAI does not know is a 400 too ("unrecognized request argument"), as OpenAI answers, so a
typo is never silently ignored.

>>> field_problem({"prompt": "x", "best_of": 3}, chat=False)[1:]
('best_of', 'unsupported_parameter')
"""

from __future__ import annotations

EXTENSIONS = {"top_k", "repetition_penalty", "no_repeat_ngram_size"}  # DTL's (and vLLM's)
COMMON = {
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "logprobs", "stop", "presence_penalty", "frequency_penalty",
    "logit_bias", "seed", "user", *EXTENSIONS,
}  # fmt: skip
COMPLETION = COMMON | {"prompt", "echo", "best_of", "suffix"}
# accepted and used, or accepted as no-ops (user, metadata, service_tier "auto"/"default",
# parallel_tool_calls without tools, prompt_cache_key, safety_identifier: no output changes)
CHAT = COMMON | {
    "messages", "top_logprobs", "response_format", "tools", "tool_choice", "functions",
    "function_call", "parallel_tool_calls", "store", "metadata", "service_tier", "modalities",
    "audio", "prediction", "reasoning_effort", "web_search_options", "verbosity",
    "prompt_cache_key", "safety_identifier",
}  # fmt: skip


Problem = tuple[str, str, str]  # (message, param, code) of the 400


def _unsupported(name: str, why: str) -> Problem:
    return f"'{name}' is not supported: {why}", name, "unsupported_parameter"


def field_problem(body: dict, chat: bool) -> Problem | None:
    """The 400 for the first field of `body` that is unknown or asks for something this
    server does not do (see the module docs), or None when all are served."""
    known = CHAT if chat else COMPLETION
    for name in body:
        if name not in known:
            return f"unrecognized request argument supplied: '{name}'", name, "unknown_parameter"
    given = {k: v for k, v in body.items() if v is not None}
    if given.get("suffix"):
        return _unsupported(
            "suffix", "this model only continues a prompt (no insertion); leave it out"
        )
    best_of, n = given.get("best_of"), given.get("n", 1)
    if best_of is not None and best_of != n:
        return _unsupported("best_of", f"only best_of equal to n ({n}) is served; leave it out")
    if not chat:
        return None
    for name in ("tools", "functions"):
        if given.get(name):
            return _unsupported(name, "this model cannot call tools")
    for name in ("tool_choice", "function_call"):
        if name in given and given[name] != "none":
            return _unsupported(name, "this model cannot call tools; leave it out or send 'none'")
    fmt = given.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        return _unsupported("response_format", "this model writes plain text only "
                           "({\"type\": \"text\"})")  # fmt: skip
    if given.get("modalities", ["text"]) != ["text"]:
        return _unsupported("modalities", "this model reads and writes text only (['text'])")
    for name in ("audio", "prediction", "reasoning_effort", "web_search_options", "verbosity"):
        if name in given:
            return _unsupported(name, "this model has no such feature; leave it out")
    if given.get("store"):
        return _unsupported("store", "this server keeps no completions; leave it out")
    if given.get("service_tier", "auto") not in ("auto", "default"):
        return _unsupported("service_tier", "there is one tier ('auto' or 'default')")
    return None
