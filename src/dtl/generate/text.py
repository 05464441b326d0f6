"""Text in, text out: `generate`, `stream` and `stream_batch` over the token loop, with the
tokenizer, stop strings and UTF-8-safe streaming (`dtl generate`, `dtl ask`, `dtl chat`).

>>> for piece in stream(model, tok, "Once upon a time", max_new_tokens=50):  # doctest: +SKIP
...     print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dtl.errors import DtlError
from dtl.generate.batch import ContinuousBatch, StreamChunk
from dtl.generate.context import Fit
from dtl.generate.loop import Request
from dtl.generate.sampling import SamplingOptions


@dataclass
class Completion:
    """One prompt's result: the new text, its token ids and why it ended; `prompt_tokens` is
    how many of the prompt's tokens the model saw, and `fit` how prompt and answer were fitted
    to the context (`fit.note()` says what was cut, or None)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"
    fit: Fit | None = None


def stream_requests(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[Request],
    use_cache: bool = True,
    truncate: bool = True,
    stop_at_eos: bool = True,
) -> Iterator[StreamChunk]:
    """Generate for several requests at once, each with its own options, yielding text pieces
    as they are decoded; `chunk.index` counts the rows of all requests in order.

    Every row ends with exactly one chunk whose `finish_reason` is "stop" (end-of-text or a
    stop string; the stop string itself is not part of the text) or "length". Each request is
    fitted to the context on its own (`fit_request`: max_new_tokens cut to the room its
    longest prompt leaves; a prompt that fills the context alone left-truncated unless
    `truncate=False`, which raises), and they are decoded together as far as the context
    allows, the others joining as the first finish: each gets what it gets alone.
    """
    if not requests or not all(r.prompts for r in requests):
        raise DtlError("no prompts given: pass at least one prompt")
    batch = ContinuousBatch(
        model,
        tokenizer,
        max_rows=sum(len(r.prompts) for r in requests),
        truncate=truncate,
        stop_at_eos=stop_at_eos,
        use_cache=use_cache,
    )
    for r in requests:  # all checked before the first token
        batch.fit(r)
    first, row = {}, 0
    for r in requests:
        first[id(r)] = row
        row += len(r.prompts)
    waiting = deque(requests)
    while waiting or batch:
        joining: list[Request] = []
        while waiting and batch.fits([*joining, waiting[0]]):
            joining.append(waiting.popleft())
        if waiting and not joining and not batch:  # fitted alone, it fits an empty batch:
            joining.append(waiting.popleft())  # never wait on nothing
        if joining:
            batch.add(joining)
        for request, item in batch.step():
            if isinstance(item, Exception):
                raise item
            item.index += first[id(request)]
            yield item


def stream_batch(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    use_cache: bool = True,
    truncate: bool = True,
    stop_at_eos: bool = True,
    options: SamplingOptions | None = None,
) -> Iterator[StreamChunk]:
    """Generate for several prompts at once (one request: its rows share `seed`'s generator),
    yielding text pieces as they are decoded. `options` replaces the sampling arguments.

    >>> for chunk in stream_batch(model, tok, ["Once", "The"], 20):  # doctest: +SKIP
    ...     print(chunk.index, chunk.text)
    """
    if options is None:
        options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed,
                                  max_new_tokens, stop)  # fmt: skip
    request = Request(list(prompts), options)
    yield from stream_requests(model, tokenizer, [request], use_cache, truncate, stop_at_eos)


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    use_cache: bool = True,
    truncate: bool = True,
    options: SamplingOptions | None = None,
) -> list[Completion]:
    """Complete each prompt; returns one `Completion` (text, token_ids, finish_reason) each.

    The prompts are one request: max_new_tokens is cut to the room the longest leaves in the
    model's context, and a prompt that fills it alone loses its oldest tokens (unless
    `truncate=False`, which raises); each `Completion.fit.note()` says what was cut.

    >>> [c.text for c in generate(model, tok, ["Question: Who?\\nAnswer:"], 32,
    ...                           temperature=0, stop=["\\nQuestion:"])]  # doctest: +SKIP
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if options is None:
        options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed,
                                  max_new_tokens, stop)  # fmt: skip
    request = Request(prompts, options)
    texts = [""] * len(prompts)
    results: list[Completion | None] = [None] * len(prompts)
    for chunk in stream_requests(model, tokenizer, [request], use_cache, truncate):
        texts[chunk.index] += chunk.text
        if chunk.finish_reason is not None:
            n = len(request.prompt_ids[chunk.index])
            results[chunk.index] = Completion(
                texts[chunk.index], chunk.token_ids, n, chunk.finish_reason, request.fit
            )
    return results  # type: ignore[return-value]


def stream(
    model: torch.nn.Module, tokenizer, prompt: str, options: SamplingOptions | None = None, **kwargs
) -> Iterator[str]:
    """Yield one prompt's completion as text pieces (never a broken UTF-8 character).

    Takes a `SamplingOptions`, or `generate`'s keyword options.

    >>> for piece in stream(model, tok, "Once upon a time", max_new_tokens=50):  # doctest: +SKIP
    ...     print(piece, end="", flush=True)
    """
    for chunk in stream_batch(model, tokenizer, [prompt], options=options, **kwargs):
        if chunk.text:
            yield chunk.text
