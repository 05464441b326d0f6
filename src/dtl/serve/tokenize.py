"""The tokenizer over HTTP, in vLLM's shapes (what lm-evaluation-harness's remote tokenizer
reads, so the harness needs no copy of the tokenizer and no Hub):

    POST /tokenize         {"prompt": TEXT} or {"messages": [...]} (the chat template's
                           prompt), optional "add_special_tokens", "return_token_strs"
                           -> {"count", "max_model_len", "tokens": [ids], "token_strs"}
    POST /detokenize       {"tokens": [ids]} -> {"prompt": TEXT}
    GET  /tokenizer_info   {"tokenizer_class", "eos_token", "bos_token", "model_max_length",
                           "vocab_size", ...}

As vLLM's (Hugging Face) tokenizers do, /tokenize reads the text "<|endoftext|>" as the
end-of-text token (the harness asks for the id of `eos_token` that way). Completions' string
prompts never do: user text there cannot forge an end of document. `add_special_tokens` adds
nothing: DTL's tokenizers add no special tokens to a text.

>>> add_tokenizer_routes(app)  # doctest: +SKIP
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi import Request as HttpRequest

from dtl.serve.wire import ApiError, chat_prompt, check_model, json_body
from dtl.tokenizer import EOT_TEXT

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "return_token_strs",
                   "add_generation_prompt", "continue_final_message"}  # fmt: skip


def encode_with_eot(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, each "<|endoftext|>" in it the end-of-text token."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(EOT_TEXT)):
        if i:
            ids.append(tokenizer.eos_id)
        ids += tokenizer.encode(piece) if piece else []
    return ids


def _token_ids(body: dict, vocab_size: int) -> list[int]:
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise ApiError("'tokens' must be a list of token ids", "tokens", "invalid_type")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                       "tokens", "invalid_value")  # fmt: skip
    return tokens


def add_tokenizer_routes(app: FastAPI) -> None:
    """/tokenize, /detokenize and /tokenizer_info (see the module docs) for `app`'s model."""
    state = app.state
    context = state.model.config.context

    @app.post("/tokenize")
    async def tokenize(http: HttpRequest):
        body = await json_body(http)
        check_model(body, state.model_name)
        for name in body:
            if name not in TOKENIZE_FIELDS:
                raise ApiError(f"unrecognized request argument supplied: '{name}'", name,
                               "unknown_parameter")  # fmt: skip
        if "messages" in body:
            text = chat_prompt(body["messages"])
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise ApiError("send 'prompt' (a string) or 'messages' (a chat)", "prompt")
        ids = encode_with_eot(state.tokenizer, text)
        strs = None
        if body.get("return_token_strs"):
            strs = [state.tokenizer.decode([t]) for t in ids]
        return {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest):
        body = await json_body(http)
        check_model(body, state.model_name)
        ids = _token_ids(body, state.tokenizer.vocab_size)
        return {"prompt": state.tokenizer.decode(ids)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = state.tokenizer
        return {
            "tokenizer_class": f"dtl.{tok.name}",
            "eos_token": EOT_TEXT,
            "bos_token": EOT_TEXT,  # as GPT-2's: a document starts after an end-of-text
            "pad_token": None,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": context,
            "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_id,
        }
