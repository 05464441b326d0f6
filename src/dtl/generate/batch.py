"""Continuous batching at the text level: requests join a running `TokenLoop` between two
steps and leave it when they finish, each row's tokens turned into text as they come. The
server runs one (a new request waits for one step, not a whole batch); `generate` and
`stream` run one with every request added at the start.

Each request's prompts are prefilled together with those that arrived with it (one padded
forward: a burst of clients waits for one prefill, not one each), and its cache is merged
into the batch's. Every step samples each request's rows with its own options and seeded
generator, and finished rows keep drawing (and are fed padding) until the whole request is
done, just as they do alone: what a request gets does not depend on its neighbours.

>>> from dtl.generate import SamplingOptions
>>> batch = ContinuousBatch(model, tokenizer, max_rows=16)
>>> batch.add([Request(["Once upon a time"], SamplingOptions(max_new_tokens=20))])
>>> pieces = []
>>> while batch:
...     for request, item in batch.step():  # a StreamChunk, or the Exception it failed with
...         pieces.append(item.text)
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dtl.generate.context import Fit, fit_context, fits
from dtl.generate.loop import Request, TokenLoop, encode_rows
from dtl.generate.score import TokenLogprob


@dataclass
class StreamChunk:
    """A piece of row `index`'s text; `finish_reason` is set on the row's last chunk. With
    `logprobs` asked for, the figures of the tokens drawn since the row's previous chunk
    (every token drawn, the end-of-text that ends a row included)."""

    index: int
    text: str
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


class RowText:
    """Turns one row's tokens into text pieces: UTF-8 safe, and holding back any tail that
    could be the start of a stop string until it is known not to be one."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of self.text already handed out
        self.ids: list[int] = []
        self.finished: str | None = None
        self.logprobs: list[TokenLogprob] | None = None  # drawn since the last chunk

    def push(self, token: int, eos_id: int | None) -> str:
        """Add a token; return the text now safe to show (maybe '')."""
        if token == eos_id:
            return self.finish("stop")
        self.ids.append(token)
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        for s in self.stop:  # a stop string may only have appeared near the new end
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at != -1:
                self.text = self.text[:at]
                return self.finish("stop")
        keep = self._held_back()
        piece = self.text[self.sent : len(self.text) - keep]
        self.sent += len(piece)
        return piece

    def advance(
        self,
        index: int,
        token: int,
        eos_id: int | None,
        max_new_tokens: int,
        logprob: TokenLogprob | None = None,
    ) -> StreamChunk | None:
        """Push row `index`'s next token (and its `logprob`, when asked for); the chunk to
        send, if any (the row's last one, with its finish_reason, at end-of-text, a stop string
        or max_new_tokens)."""
        if logprob is not None:
            self.logprobs = [*(self.logprobs or []), logprob]
        piece = self.push(token, eos_id)
        if self.finished is None and len(self.ids) >= max_new_tokens:
            piece += self.finish("length")
        if self.finished is None and not piece:
            return None
        chunk = StreamChunk(index, piece, self.finished, logprobs=self.logprobs)
        if self.finished is not None:
            chunk.token_ids = list(self.ids)
        self.logprobs = None if self.logprobs is None else []
        return chunk

    def finish(self, reason: str) -> str:
        """End the row; return whatever was held back."""
        if self.finished is None:
            self.finished = reason
            if reason != "stop":  # a cut at a stop string drops the undecoded tail with it
                self.text += self.decoder.decode(b"", final=True)
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if s.startswith(self.text[-n:]):
                    best = n
                    break
        return best


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids (an empty prompt is one end-of-text token, as GPT-2 starts)."""
    return [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]


def prompt_lengths(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Prompt token counts as the model sees them (an empty prompt is one end-of-text)."""
    return [len(ids) for ids in encode_prompts(tokenizer, prompts)]


def fit_request(request: Request, tokenizer, context: int, truncate: bool = True) -> Fit:
    """Encode the request's prompts (unless it holds their `prompt_ids` already: each prompt
    is tokenized once) and fit them and its max_new_tokens to `context` by the one rule,
    `fit_context`, on its longest prompt: `prompt_ids` keep their last tokens and `options`
    the max_new_tokens that fit. Returns the `Fit` (also `request.fit`), whose `note()` says
    what was cut; a request fitted before is left as it is.

    >>> fit_request(Request(["Who is Romeo?"], ASK_DEFAULTS), tok, 16).note()  # doctest: +SKIP
    "max_new_tokens cut from 64 to 12: the model's context is 16 tokens and the prompt takes 4"
    """
    if request.prompt_ids is None:
        request.prompt_ids = encode_prompts(tokenizer, request.prompts)
    if request.fit is not None:
        return request.fit
    longest = max(len(ids) for ids in request.prompt_ids)
    fit = fit_context(longest, request.options.max_new_tokens, context, truncate)
    if fit.dropped:
        request.prompt_ids = [ids[-fit.prompt_tokens :] for ids in request.prompt_ids]
    if fit.cut:
        request.options = dataclasses.replace(request.options, max_new_tokens=fit.max_new_tokens)
    request.fit = fit
    return fit


class ContinuousBatch:
    """Rows decoded together one token per step, requests joining and leaving between steps.

    `max_rows` bounds the rows decoded together (a request alone may be larger). A request's
    max_new_tokens is cut to the room its prompts leave in the context (`fit_request`);
    `truncate` lets a prompt that fills the context alone lose its oldest tokens (else that
    is an error); `stop_at_eos=False` lets rows run past end-of-text."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        max_rows: int = 16,
        *,
        truncate: bool = False,
        stop_at_eos: bool = True,
        use_cache: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.max_rows, self.truncate = (
            model,
            tokenizer,
            max_rows,
            truncate,
        )
        self.eos_id = tokenizer.eos_id if stop_at_eos else None
        self.loop = TokenLoop(model, self.eos_id, use_cache)

    def __len__(self) -> int:
        return len(self.loop)

    @property
    def requests(self) -> list[Request]:
        return self.loop.requests

    @property
    def n_rows(self) -> int:
        return self.loop.n_rows

    def fits(self, requests: Sequence[Request]) -> bool:
        """Whether `requests` (fitted: see `fit_request`) can join now, together: rows and
        context both. One request may be larger than `max_rows` when it joins an empty batch
        alone; in a running batch every row shares the cache's length, so the longest of it
        and the new prompts plus the most tokens any request may still draw must fit."""
        rows = sum(len(r.prompt_ids) for r in requests)
        if self.n_rows + rows > self.max_rows and (self.loop.requests or len(requests) > 1):
            return False
        cache = self.loop.cache
        longest = max(len(ids) for r in requests for ids in r.prompt_ids)
        length = max(longest, cache.length if cache is not None else 0)
        room = self.loop.room_needed(max(r.options.max_new_tokens for r in requests))
        return fits(length, room, self.model.config.context)

    def fit(self, request: Request) -> Fit:
        """Fit `request` to the model's context (`fit_request`, with this batch's `truncate`)."""
        return fit_request(request, self.tokenizer, self.model.config.context, self.truncate)

    @torch.no_grad()
    def add(self, requests: Sequence[Request]) -> None:
        """Prefill the requests' prompts as one padded batch and let them join (raises if any
        fails, leaving the batch as it was: the caller may then add them one at a time).
        Each request is fitted first (`fit`: its prompts encoded unless it holds their
        `prompt_ids`, its max_new_tokens cut to the room they leave). The caller checks that
        they fit beside the running ones (`fits`)."""
        for r in requests:
            self.fit(r)
        prompt_ids = [ids for r in requests for ids in r.prompt_ids]
        device = next(self.model.parameters()).device
        ids, mask = encode_rows(prompt_ids, self.tokenizer.eos_id, device)
        self.loop.add(ids, mask, list(requests))
        for r in requests:
            r.rows = [RowText(self.tokenizer, r.options.stop) for _ in r.prompts]

    def drop(self, request: Request) -> None:
        """Take a request out (its client left); the others go on."""
        self.loop.keep([r for r in self.loop.requests if r is not request])

    def clear(self) -> None:
        self.loop.clear()

    @torch.no_grad()
    def step(self) -> list[tuple[Request, StreamChunk | Exception]]:
        """Draw one token for every row; return what each request gets: text pieces (a row's
        last piece has its finish_reason), or the Exception it failed with.

        Never raises: a request whose draw fails (say, NaN logits) fails alone, and should
        the batch's forward fail, every request still in it gets the error, after the pieces
        already drawn. Finished and failed requests leave the batch."""
        out: list[tuple[Request, StreamChunk | Exception]] = []
        tokens: dict[int, Tensor] = {}  # id(request) -> its rows' tokens, for those that go on
        for r in self.loop.requests:
            try:
                token = self.loop.draw(r)  # (n,)
            except Exception as err:
                out.append((r, err))
                continue
            out += [(r, chunk) for chunk in self._advance(r, token)]
            if not r.finished:
                tokens[id(r)] = token
        self.loop.keep([r for r in self.loop.requests if id(r) in tokens])
        if not self.loop.requests:
            return out
        try:
            self.loop.feed(torch.cat([tokens[id(r)] for r in self.loop.requests]))
        except Exception as err:
            out += [(r, err) for r in self.loop.requests]
            self.clear()
        return out

    def _advance(self, request: Request, token: Tensor) -> list[StreamChunk]:
        """Each row's new text; a row that ends (end-of-text, a stop string, its
        max_new_tokens) is marked done, so it is fed padding from now on."""
        chunks = []
        for i, t in enumerate(token.tolist()):
            row = request.rows[i]
            if row.finished is not None:
                continue
            logprob = None if request.drawn is None else request.drawn[i]
            chunk = row.advance(i, t, self.eos_id, request.options.max_new_tokens, logprob)
            if row.finished is not None:
                request.done[i] = True
            if chunk is not None:
                chunks.append(chunk)
        return chunks
