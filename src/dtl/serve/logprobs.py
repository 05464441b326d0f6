"""Token log-probabilities in OpenAI's response shapes (the figures come from
`dtl.generate.score`: log_softmax of the raw logits, before bias, penalties or temperature).

Completions (`logprobs: N`, and `echo`):
    {"tokens": [text, ...], "token_logprobs": [float | null, ...],
     "top_logprobs": [{text: float, ...} | null, ...], "text_offset": [int, ...]}
  one entry per token: the prompt's first (with `echo`; the first token has no context, so
  its figures are null), then each token drawn. `top_logprobs` holds the N most likely
  tokens at that position (N = 0: empty); `text_offset` is where each token's text starts in
  the choice's `text` (with `echo`, the prompt is part of it).
Chat (`logprobs: true`, `top_logprobs: N`):
    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
     "bytes"}, ...]}, ...], "refusal": null}

A token's text is its bytes decoded on their own (a token holding part of a UTF-8 character
shows U+FFFD; chat's `bytes` has the exact bytes).

>>> from types import SimpleNamespace
>>> tok = SimpleNamespace(decode_bytes=lambda ids: b"ab"[ids[0]:ids[0] + 1])
>>> out, end = completion_logprobs(tok, [None, TokenLogprob(1, -0.5, [(0, -0.1)])], [0, 1])
>>> out["tokens"], out["token_logprobs"], out["top_logprobs"], out["text_offset"], end
(['a', 'b'], [None, -0.5], [None, {'a': -0.1}], [0, 1], 2)
"""

from __future__ import annotations

from dtl.generate.score import TokenLogprob


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


def completion_logprobs(
    tokenizer, entries: list[TokenLogprob | None], tokens: list[int] | None = None, offset: int = 0
) -> tuple[dict, int]:
    """OpenAI's completions `logprobs` object for `entries` (None: a token with no figures,
    whose id is then taken from `tokens`), the first starting at character `offset`; and the
    offset after the last."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}  # fmt: skip
    for i, entry in enumerate(entries):
        token = entry.token if entry is not None else tokens[i]
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry.logprob)
        top: dict[str, float] = {}
        for t, lp in entry.top:  # most likely first; two tokens of one text keep the first
            top.setdefault(token_text(tokenizer, t), lp)
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat `logprobs` object for the drawn tokens' `entries`."""

    def item(token: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}  # fmt: skip

    content = [
        {**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}
