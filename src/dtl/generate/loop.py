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
prompt + max_new_tokens does not fit, the prompt is left-truncated (its oldest tokens are
dropped) so that it does, unless `truncate=False`, which raises a DtlError instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dtl.errors import DtlError
from dtl.generate.decode import DecodePlan, plan_if_fast
from dtl.generate.sampling import SamplingOptions, context_tokens, sample_next, seeded_generator
from dtl.generate.score import TokenLogprob, step_logprobs
from dtl.model.kv_cache import KVCache


@dataclass(eq=False)
class Request:
    """One request: its rows (one per prompt; `n` samples of a prompt repeat it) and how they
    generate. The loop keeps its state here while it runs, so this is its only record.

    >>> Request(["Once upon a time"], SamplingOptions(max_new_tokens=20, seed=0))  # doctest: +SKIP
    """

    prompts: list = field(default_factory=list)  # one per row: text (or None, token level)
    options: SamplingOptions = field(default_factory=SamplingOptions)
    prompt_ids: list[list[int]] | None = None  # the prompts' token ids, once encoded
    echo: bool = False  # score the prompts' own tokens first (`prompt_logprobs`, per row)
    score_only: bool = False  # echo and generate nothing (OpenAI's max_tokens 0)
    prompt_logprobs: list[list[TokenLogprob | None]] | None = None
    # -- its state in a running loop
    generator: torch.Generator | None = None  # every row of the request draws from it
    logits: Tensor | None = None  # (n, V): the next-token logits of its rows
    seen: Tensor | None = None  # (n, V) bool, the rows' context, for the repetition penalty
    history: list[list[int]] | None = None  # each row's tokens so far, for no-repeat n-grams
    counts: Tensor | None = None  # (n, V): tokens each row generated, presence/frequency
    drawn: list[TokenLogprob] | None = None  # options.logprobs: the last draw's, one per row
    done: Tensor | None = None  # (n,) bool: rows that ended (drawing on, fed padding)
    steps: int = 0  # tokens drawn so far
    rows: list = field(default_factory=list)  # text level: a `RowText` per row
    # -- for a caller on another thread (the server): where its pieces go, and whether to stop
    send: object = None  # callable(item), or None
    cancelled: bool = False

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
    the vocabulary head. With a `DecodePlan` (CPU models, `dtl.generate.decode`) the model's
    forward runs one-token steps and the head on weights laid out for memory speed; the loop
    gets the plan once, not every step."""
    return model(input_ids, attention_mask, cache=cache, last_only=True, layout=plan)[:, -1]


def fit_context(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    max_new_tokens: int,
    context: int,
    truncate: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Left-truncate (B, T) prompts so T + max_new_tokens <= context, or raise."""
    if max_new_tokens < 1:
        raise DtlError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= context:
        raise DtlError(
            f"max_new_tokens ({max_new_tokens}) must be below the model's context ({context} "
            "tokens, what it was trained at) so that at least one prompt token fits"
        )
    room = context - max_new_tokens
    if input_ids.size(1) <= room:
        return input_ids, attention_mask
    if not truncate:
        raise DtlError(
            f"prompt of {input_ids.size(1)} tokens + {max_new_tokens} new tokens exceeds the "
            f"model's context ({context} tokens, what it was trained at); shorten the prompt or "
            "max_new_tokens"
        )
    mask = None if attention_mask is None else attention_mask[:, -room:]
    if mask is not None and bool((mask.sum(1) == 0).any()):
        raise DtlError("after left-truncation a prompt has no tokens left; shorten the padding")
    return input_ids[:, -room:], mask


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
            r.seen = None
            if o.repetition_penalty != 1.0:
                mask = None if attention_mask is None else attention_mask[rows]
                r.seen = context_tokens(input_ids[rows], mask, model.config.vocab_size)
            r.history = None
            if o.no_repeat_ngram_size:
                r.history = row_tokens(input_ids[rows], attention_mask, rows)
            r.counts = None
            if o.presence_penalty or o.frequency_penalty:
                r.counts = torch.zeros(rows.stop - rows.start, model.config.vocab_size, device=device)
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
        token = sample_next(request.logits, opts, request.seen, request.generator,
                            request.history, request.counts)  # fmt: skip
        token = torch.where(request.done, torch.full_like(token, self.pad), token)
        if opts.logprobs is not None:  # of the raw logits, whatever the draw's adjustments
            request.drawn = step_logprobs(request.logits, token, opts.logprobs)
        if request.counts is not None:  # only live rows' tokens count
            live = (~request.done).to(request.counts.dtype)
            request.counts[torch.arange(token.size(0), device=token.device), token] += live
        if request.history is not None:
            for seq, t in zip(request.history, token.tolist(), strict=True):
                seq.append(t)
        if request.seen is not None:
            request.seen[torch.arange(token.size(0), device=token.device), token] = True
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

    The prompt must already fit (see `fit_context`). Rows that produced `eos_id` keep
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


def row_tokens(input_ids: Tensor, attention_mask: Tensor | None, rows: slice) -> list[list[int]]:
    """The unpadded token ids of `input_ids` (the rows of one request, (n, T)) as lists."""
    if attention_mask is None:
        return input_ids.tolist()
    mask = attention_mask[rows].bool()
    return [ids[m].tolist() for ids, m in zip(input_ids, mask, strict=True)]


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
    of 1 (token) / 0 (padding). The result is the (possibly left-truncated, see the module
    docs) prompt followed by the new tokens; rows that stopped at `eos_id` are padded with it.
    Generation stops early once every row has produced `eos_id`. `options` (a
    `SamplingOptions`) replaces the sampling arguments when given.

    >>> generate_tokens(model, ids, max_new_tokens=20, top_k=50, seed=0)  # doctest: +SKIP
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    if options is None:
        options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed,
                                  max_new_tokens=max_new_tokens)  # fmt: skip
    input_ids, attention_mask = fit_context(
        input_ids, attention_mask, options.max_new_tokens, model.config.context, truncate
    )
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
