"""The token loop: the one place where tokens are drawn and fed back through the model.

Each step takes the next-token logits of every row, draws a token per row (`sample_next`, each
request's rows with its own options and seeded generator), and feeds only those tokens through
the model again: the KV cache holds the keys and values of everything before, and only the last
position goes through the vocabulary head. `generate_tokens` / `iter_tokens` (token ids),
`dtl.generate.text` (`generate`, `stream`: `dtl generate`, `ask`, `chat`) and the server's
continuous batching (`dtl.generate.batch`) all drive this `TokenLoop`.

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100)).eval()
>>> out = generate_tokens(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
>>> out.shape  # the prompt followed by 5 new tokens
torch.Size([1, 8])

Context length: a prompt never runs the model past its context, `model.config.context`: the
tokens per row it was trained at (else, for a model saved before that was recorded, its
`max_seq_length`); positions past it were never trained and only cost quality. When
prompt + max_new_tokens does not fit, max_new_tokens is cut to the room the prompt leaves, and
a prompt that fills the context alone loses its oldest tokens (or, with `truncate=False`, is a
DtlError): `dtl.generate.context.fit_context`, the one rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dtl.errors import DtlError
from dtl.generate.context import Fit, fit_context
from dtl.generate.decode import DecodePlan, plan_if_fast
from dtl.generate.sampling import PenaltyState, SamplingOptions, sample_next, seeded_generator
from dtl.generate.score import TokenLogprob, step_logprobs
from dtl.model.kv_cache import KVCache


@dataclass(eq=False)
class Request:
    """One request: its rows (one per prompt; `n` samples of a prompt repeat it) and how they
    generate. The loop keeps its state here while it runs, so this is its only record. Who
    asked for it (a server's client, a CLI) is no part of it: a server keeps its own record
    beside it.

    >>> Request(["Once upon a time"], SamplingOptions(max_new_tokens=20, seed=0))  # doctest: +SKIP
    """

    prompts: list = field(default_factory=list)  # one per row: text (or None, token level)
    options: SamplingOptions = field(default_factory=SamplingOptions)
    prompt_ids: list[list[int]] | None = None  # the prompts' token ids, once encoded
    echo: bool = False  # score the prompts' own tokens first (`prompt_logprobs`, per row)
    score_only: bool = False  # echo and generate nothing (OpenAI's max_tokens 0)
    prompt_logprobs: list[list[TokenLogprob | None]] | None = None
    # how its prompts and answers fit the context (`fit_context`; options and prompt_ids are
    # cut to it), once the request is fitted
    fit: Fit | None = None
    # -- its state in a running loop
    generator: torch.Generator | None = None  # every row of the request draws from it
    logits: Tensor | None = None  # (n, V): the next-token logits of its rows
    penalties: PenaltyState | None = None  # what the penalties remember of its rows
    drawn: list[TokenLogprob] | None = None  # options.logprobs: the last draw's, one per row
    done: Tensor | None = None  # (n,) bool: rows that ended (drawing on, fed padding)
    steps: int = 0  # tokens drawn so far
    rows: list = field(default_factory=list)  # text level: a `RowText` per row

    @property
    def finished(self) -> bool:
        return self.done is not None and bool(self.done.all())


# ---------------------------------------------------------------------- the forward
def last_logits(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: KVCache | None,
    plan: DecodePlan | None = None,
) -> Tensor:
    """The next-token logits (B, V) after `input_ids`: only the last position goes through
    the vocabulary head. With a `DecodePlan` (CPU models, `dtl.generate.decode`) and a cache,
    the prompt and every step go through the plan (`DecodePlan.last_logits`: DTL's step
    kernel, else the eager step or the forward on its layouts); the loop gets the plan once,
    not every step."""
    if plan is not None and cache is not None:
        return plan.last_logits(model, input_ids, attention_mask, cache)  # (B, V)
    return model(input_ids, attention_mask, cache=cache, last_only=True, layout=plan)[:, -1]


def keep_last(
    input_ids: Tensor, attention_mask: Tensor | None, n: int
) -> tuple[Tensor, Tensor | None]:
    """The last `n` columns of left-padded (B, T) prompts: what a `Fit` keeps of them."""
    if input_ids.size(1) <= n:
        return input_ids, attention_mask
    mask = None if attention_mask is None else attention_mask[:, -n:]
    if mask is not None and bool((mask.sum(1) == 0).any()):
        raise DtlError("after left-truncation a prompt has no tokens left; shorten the padding")
    return input_ids[:, -n:], mask


# ---------------------------------------------------------------------- the loop
class TokenLoop:
    """Rows decoded together one token per step. Requests join between steps (`add`: their
    prompts are prefilled as one padded batch and their cache merged in) and leave (`keep`);
    each draws with its own options and generator, so what it gets does not depend on its
    neighbours. `use_cache=False` recomputes the whole context every step (the reference the
    cache must equal; requests cannot join then).
    """

    def __init__(self, model: torch.nn.Module, eos_id: int | None, use_cache: bool = True):
        self.model, self.eos_id, self.use_cache = model, eos_id, use_cache
        self.pad = 0 if eos_id is None else eos_id  # what a finished row is fed
        self.requests: list[Request] = []
        self.cache: KVCache | None = None
        self.context: tuple[Tensor, Tensor | None] | None = None  # use_cache=False: all so far
        self.plan: DecodePlan | None = None

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def n_rows(self) -> int:
        return sum(int(r.done.numel()) for r in self.requests)

    def room_needed(self, extra: int = 0) -> int:
        """Free cache slots the batch must keep: the most tokens any request may still draw."""
        return max([extra] + [r.options.max_new_tokens - r.steps for r in self.requests])

    @torch.no_grad()
    def add(
        self, input_ids: Tensor, attention_mask: Tensor | None, requests: list[Request]
    ) -> None:
        """Prefill the (B, T) left-padded rows of `requests` (in order, `len(r.prompts)` rows
        each) and let them join. Raises on a bad input, leaving the loop as it was."""
        model, device = self.model, input_ids.device
        if self.plan is None or not self.requests:  # weights may have changed between batches
            self.plan = plan_if_fast(model)
        room = self.room_needed(max(r.options.max_new_tokens for r in requests))
        cache = None
        if self.use_cache:  # joining a running batch: prefilled alone, then merged in
            extra = room if not self.requests else 0
            cache = model.allocate_cache(input_ids.size(0), input_ids.size(1) + extra)
        elif self.requests:
            raise DtlError("requests cannot join a loop that runs without a KV cache")
        logits = last_logits(model, input_ids, attention_mask, cache, self.plan)  # (rows, V)
        row = 0
        for r in requests:
            rows = slice(row, row + len(r.prompts))
            row = rows.stop
            o = r.options
            r.generator = seeded_generator(o.seed, device)
            r.logits, r.steps = logits[rows], 0
            r.done = torch.zeros(rows.stop - rows.start, dtype=torch.bool, device=device)
            mask = None if attention_mask is None else attention_mask[rows]
            r.penalties = PenaltyState.start(o, input_ids[rows], mask, model.config.vocab_size)
        if cache is None:
            self.context = (input_ids, attention_mask)
        elif self.cache is None:
            self.cache = cache
        else:
            self.cache = KVCache.merge([self.cache, cache], room)
        self.requests += requests

    def draw(self, request: Request) -> Tensor:
        """The request's next tokens (n,): finished rows get padding; end-of-text ends a row."""
        opts = request.options
        token = sample_next(request.logits, opts, request.penalties, request.generator)
        token = token.masked_fill(request.done, self.pad)  # one op, not full_like + where
        if opts.logprobs is not None:  # of the raw logits, whatever the draw's adjustments
            request.drawn = step_logprobs(request.logits, token, opts.logprobs)
        if request.penalties is not None:
            request.penalties.update(token, ~request.done)
        if self.eos_id is not None:
            request.done |= token == self.eos_id
        request.steps += 1
        return token

    @torch.no_grad()
    def feed(self, tokens: Tensor) -> None:
        """One forward of `tokens` (B,), a token per row of the requests in order; each
        request's `logits` become its rows' next-token logits."""
        step = tokens[:, None]  # (B, 1)
        if self.cache is not None:
            logits = last_logits(self.model, step, None, self.cache, self.plan)
        else:  # recompute the whole context: the reference the cache must equal
            ids, mask = self.context
            ids = torch.cat([ids, step], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            self.context = (ids, mask)
            logits = last_logits(self.model, ids, mask, None, self.plan)
        row = 0
        for r in self.requests:
            n = r.done.numel()
            r.logits = logits[row : row + n]
            row += n

    def keep(self, requests: list[Request]) -> None:
        """Only `requests` (a subset, in order) go on; the others' rows leave the cache."""
        if len(requests) == len(self.requests):
            return
        if not requests:
            self.clear()
            return
        kept = {id(r) for r in requests}
        rows, row = [], 0
        for r in self.requests:
            n = r.done.numel()
            if id(r) in kept:
                rows.extend(range(row, row + n))
            row += n
        self.cache = self.cache.keep_rows(rows)
        self.requests = requests

    def clear(self) -> None:
        self.requests, self.cache, self.context = [], None, None


# ---------------------------------------------------------------------- token level
@torch.no_grad()
def iter_tokens(
    model: torch.nn.Module,
    input_ids: Tensor,
    opts: SamplingOptions,
    eos_id: int | None = None,
    use_cache: bool = True,
    attention_mask: Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield the next token ids (B,) once per step, at most `opts.max_new_tokens` times.

    The prompt must already fit (see `dtl.generate.context`). Rows that produced `eos_id` keep
    yielding it as padding; the loop ends when every row is done.
    """
    loop = TokenLoop(model, eos_id, use_cache)
    request = Request([None] * input_ids.size(0), opts)
    loop.add(input_ids, attention_mask, [request])
    for _ in range(opts.max_new_tokens):
        token = loop.draw(request)  # (B,)
        yield token
        if request.finished:
            return
        loop.feed(token)


def generate_tokens(
    model: torch.nn.Module,
    input_ids: Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    attention_mask: Tensor | None = None,
    truncate: bool = True,
    options: SamplingOptions | None = None,
) -> Tensor:
    """Sample up to max_new_tokens after each prompt row; returns (B, T' + n) token ids.

    input_ids: (B, T), left-padded when rows differ in length, with attention_mask (B, T)
    of 1 (token) / 0 (padding). The result is the prompt (left-truncated only when it alone
    fills the context) followed by the new tokens, at most max_new_tokens of them or the room
    the prompt leaves in the context (see the module docs); rows that stopped at `eos_id` are
    padded with it. Generation stops early once every row has produced `eos_id`. `options` (a
    `SamplingOptions`) replaces the sampling arguments when given.

    >>> generate_tokens(model, ids, max_new_tokens=20, top_k=50, seed=0)  # doctest: +SKIP
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    if options is None:
        options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed,
                                  max_new_tokens=max_new_tokens)  # fmt: skip
    fit = fit_context(input_ids.size(1), options.max_new_tokens, model.config.context, truncate)
    input_ids, attention_mask = keep_last(input_ids, attention_mask, fit.prompt_tokens)
    if fit.cut:
        options = dataclasses.replace(options, max_new_tokens=fit.max_new_tokens)
    steps = list(iter_tokens(model, input_ids, options, eos_id, use_cache, attention_mask))
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


def encode_rows(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor | None]:
    """Left-pad token-id rows into (B, T) ids and mask (mask None when all rows are full)."""
    T = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompt_ids), T, dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, T - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, T - len(ids) :] = 1
    all_full = bool(mask.all())
    return input_ids.to(device), (None if all_full else mask.to(device))
