"""The sampler of the spec's "Generation Process": each next token from the last position's
logits -> logit bias -> repetition penalty (CTRL) -> presence/frequency penalties -> no-repeat
n-grams -> temperature -> top-k -> top-p -> a multinomial draw (temperature 0 = greedy argmax).
The log-probabilities a request may ask for (`logprobs`, `dtl.generate.score`) are of the raw
logits, before any of these steps.

`SamplingOptions` is the one object that says how a request generates: it is built once from
`dtl generate`'s flags or an HTTP request's JSON body and travels whole to `sample_next`.
`PenaltyState` is what the penalties remember of a request's rows (the tokens seen, drawn,
counted): set up, updated and applied here, whoever runs the loop.

>>> import torch
>>> sample_next(torch.tensor([[0.0, 3.0, 1.0]]), SamplingOptions(temperature=0), None, None)
tensor([1])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from dtl.data.qa import qa_stops
from dtl.errors import DtlError


@dataclass(frozen=True)
class SamplingOptions:
    """How a request generates: how each next token is chosen (`temperature=0` is greedy),
    and when a row ends (after `max_new_tokens`, at a `stop` string; end-of-text always ends
    it). Rows of one request draw from one generator seeded with `seed`.

    >>> SamplingOptions(temperature=0.8, top_k=50, max_new_tokens=20, stop=["\\n"]).stop
    ('\\n',)
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    no_repeat_ngram_size: int = 0  # n > 0: never complete an n-gram the row already holds
    # OpenAI's: subtract presence * [count > 0] + frequency * count from the logit of each
    # token the row has generated `count` times so far (the prompt does not count)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), sorted
    logprobs: int | None = None  # report each drawn token's log-probability and this many top
    # alternatives (0 = the drawn token's only); None = report nothing

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", tuple(s for s in stop if s))  # frozen: set once here
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise DtlError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if any(t < 0 or not -100.0 <= b <= 100.0 for t, b in self.logit_bias):
            raise DtlError("logit_bias maps token ids (>= 0) to biases in [-100, 100]")
        if self.logprobs is not None and self.logprobs < 0:
            raise DtlError(f"logprobs must be >= 0 (or None), got {self.logprobs}")
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or (self.max_new_tokens < 1)
        ):
            raise DtlError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise DtlError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DtlError(f"top_k must be a positive integer (or None for all), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise DtlError(f"top_p must be in (0, 1], got {self.top_p}")
        n = self.no_repeat_ngram_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DtlError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {n}")
        if self.repetition_penalty <= 0.0:
            raise DtlError(
                f"repetition_penalty must be > 0 (1 = off, 1.2 is typical), "
                f"got {self.repetition_penalty}"
            )


# What `dtl ask`, `dtl chat` and the web page's Ask tab start from (the page fetches it from
# the server's GET /ask_defaults): greedy, so the same question gives the same answer, with a
# repetition penalty, which stops the quickstart model's "the first time, the first time, ..."
# loops (benchmarks/bench_answers.py; figures in docs/benchmarks.md). Q&A callers add
# `qa_stops()`: `ask_options()`.
ASK_DEFAULTS = SamplingOptions(temperature=0.0, top_k=50, repetition_penalty=1.3,
                               max_new_tokens=64)  # fmt: skip


def ask_options(options: SamplingOptions = ASK_DEFAULTS) -> SamplingOptions:
    """`options` as a Q&A answer uses them: the Q&A stop strings (`qa_stops`: the answer ends
    where the model starts another "Question:" or "Answer:" line) before the options' own.
    `ask_options()` is what `dtl ask` answers with by default, and what `dtl eval` and the
    quickstart score: one object, so the scores measure what users run.

    >>> ask_options().stop, ask_options().repetition_penalty
    (('\\nQuestion:', '\\nAnswer:'), 1.3)
    """
    return dataclasses.replace(options, stop=qa_stops(options.stop))


# ---------------------------------------------------------------------- what penalties remember
@dataclass
class PenaltyState:
    """What the penalties remember of each row of a request, in one place: set up from the
    prompts (`start`), kept up to date with each drawn token (`update`), applied to the next
    logits (`apply`). A field is None when its penalty is off.

    >>> opts = SamplingOptions(temperature=0, repetition_penalty=2.0)
    >>> state = PenaltyState.start(opts, torch.tensor([[1]]), None, vocab_size=4)
    >>> state.apply(torch.tensor([[1.0, 4.0, 3.0, 0.0]]), opts)  # token 1 is in the prompt
    tensor([[1., 2., 3., 0.]])
    >>> state.update(torch.tensor([2]), live=torch.tensor([True]))  # token 2 is drawn
    >>> state.apply(torch.tensor([[1.0, 4.0, 3.0, 0.0]]), opts)
    tensor([[1.0000, 2.0000, 1.5000, 0.0000]])
    """

    seen: Tensor | None = None  # (n, V) bool: tokens in the row so far (repetition penalty)
    history: list[list[int]] | None = None  # each row's token ids so far (no-repeat n-grams)
    counts: Tensor | None = None  # (n, V): tokens each row generated (presence/frequency)

    @classmethod
    def start(
        cls,
        opts: SamplingOptions,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        vocab_size: int,
    ) -> PenaltyState | None:
        """The state of rows about to generate after `input_ids` (n, T), left-padded with
        `attention_mask` (n, T) or None; None when `opts` ask for no penalty."""
        seen = history = counts = None
        if opts.repetition_penalty != 1.0:  # the prompt counts
            seen = context_tokens(input_ids, attention_mask, vocab_size)
        if opts.no_repeat_ngram_size:  # so does it here
            history = row_tokens(input_ids, attention_mask)
        if opts.presence_penalty or opts.frequency_penalty:  # only generated tokens count
            counts = torch.zeros(input_ids.size(0), vocab_size, device=input_ids.device)
        if seen is None and history is None and counts is None:
            return None
        return cls(seen, history, counts)

    def update(self, token: Tensor, live: Tensor) -> None:
        """Remember the drawn `token` (n,) of each row; `live` (n,) bool marks rows that have
        not ended (a finished row's padding is no generated token)."""
        rows = torch.arange(token.size(0), device=token.device)
        if self.counts is not None:
            self.counts[rows, token] += live.to(self.counts.dtype)
        if self.history is not None:
            for seq, t in zip(self.history, token.tolist(), strict=True):
                seq.append(t)
        if self.seen is not None:
            self.seen[rows, token] = True

    def apply(self, logits: Tensor, opts: SamplingOptions) -> Tensor:
        """The penalised logits (n, V): repetition penalty, then presence/frequency, then
        no-repeat n-grams."""
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, opts.repetition_penalty)
        if self.counts is not None:
            logits = apply_presence_frequency(
                logits, self.counts, opts.presence_penalty, opts.frequency_penalty
            )
        if self.history is not None:
            logits = ban_repeated_ngrams(logits, self.history, opts.no_repeat_ngram_size)
        return logits


# ---------------------------------------------------------------------- sampling one step
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019): a seen token's logit is divided by `penalty` when positive,
    multiplied by it when negative, so its probability always drops for penalty > 1.

    logits: (B, V) float; seen: (B, V) bool, True where the token is in the row's context.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_logit_bias(logits: Tensor, bias: tuple[tuple[int, float], ...]) -> Tensor:
    """OpenAI's `logit_bias`: each (token id, bias) pair adds `bias` to that token's logit in
    every row (-100 bans a token in practice, 100 all but forces it). logits: (B, V)."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], device=logits.device)
    add = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, add.expand(logits.size(0), -1))


def apply_presence_frequency(
    logits: Tensor, counts: Tensor, presence: float, frequency: float
) -> Tensor:
    """OpenAI's penalties: logit[j] - presence * [c[j] > 0] - frequency * c[j], where c[j] is
    how many times the row has generated token j so far.

    logits: (B, V) float; counts: (B, V), the row's generated-token counts.
    """
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def ban_repeated_ngrams(logits: Tensor, history: list[list[int]], n: int) -> Tensor:
    """No-repeat n-grams: a token that would complete an n-gram already in the row (prompt and
    answer so far) gets logit -inf, so "the first time, the first time" cannot happen for n=3.

    logits: (B, V); history: B lists of token ids. The last n-1 tokens are the n-gram's head;
    every earlier occurrence of that head bans the token that followed it.
    """
    if n <= 0:
        return logits
    logits = logits.clone()
    for b, seq in enumerate(history):
        if len(seq) + 1 < n:  # not yet n-1 tokens of head plus the one being drawn
            continue
        head = seq[len(seq) - n + 1 :]
        banned = {seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == head}
        if banned:
            logits[b, list(banned)] = float("-inf")
    return logits


def filter_top_p(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens
    whose probabilities sum to at least p; the most likely token is always kept."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = _beyond_nucleus(probs, p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    opts: SamplingOptions,
    penalties: PenaltyState | None,
    generator: torch.Generator | None,
) -> Tensor:
    """logits (B, V) -> next token ids (B,). `penalties` (the rows' `PenaltyState`, or None
    when the options ask for none) applies the repetition, presence/frequency and no-repeat
    n-gram penalties after `logit_bias`.

    With top-k the draw is made among the k candidates only (`torch.topk` returns them
    sorted, which top-p needs): the same distribution as masking the full vocabulary, but a
    softmax and multinomial over 50 values instead of 50,257 (that was a third of the time
    of a small model's decode step).
    """
    logits = apply_logit_bias(logits.float(), opts.logit_bias)
    if penalties is not None:
        logits = penalties.apply(logits, opts)
    if opts.temperature == 0.0:
        return logits.argmax(-1)
    # Scaled as (logits - max) / T: the same distribution as logits / T, but a tiny T cannot
    # overflow to inf (and inf - inf = NaN): the best token gets 0, the rest -> -inf at worst.
    if opts.top_k is not None and opts.top_k < logits.size(-1):
        values, index = torch.topk(logits, opts.top_k, dim=-1)  # (B, k), sorted descending
        values = _top_p_sorted((values - values[:, :1]) / opts.temperature, opts.top_p)
        pick = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
        return index.gather(-1, pick).squeeze(-1)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / opts.temperature
    probs = torch.softmax(filter_top_p(logits, opts.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _top_p_sorted(values: Tensor, p: float | None) -> Tensor:
    """`filter_top_p` for logits already sorted in descending order."""
    if p is None or p >= 1.0:
        return values
    return values.masked_fill(_beyond_nucleus(torch.softmax(values, dim=-1), p), float("-inf"))


def _beyond_nucleus(sorted_probs: Tensor, p: float) -> Tensor:
    """(B, V) bool: True for the tokens top-p drops, given probabilities sorted descending:
    those whose more likely tokens already hold p. The first is never dropped, however small
    p is (a p below float32's smallest number, 1e-46, compares as 0 and dropped them all)."""
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # the probability ranked above each
    drop = mass_before >= p
    drop[..., 0] = False
    return drop


def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The generator a row group draws from: seeded, or None for torch's global one."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def context_tokens(input_ids: Tensor, attention_mask: Tensor | None, vocab_size: int) -> Tensor:
    """(B, V) bool: True where a token occurs in the row's (unpadded) prompt, which the
    repetition penalty then keeps up to date with each new token."""
    B, T = input_ids.shape
    seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=input_ids.device)
    if attention_mask is None:
        valid = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        valid = attention_mask.bool()
    rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)  # (B, T) row index
    seen[rows[valid], input_ids[valid]] = True
    return seen


def row_tokens(input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
    """The unpadded token ids of each row of `input_ids` (n, T) as lists."""
    if attention_mask is None:
        return input_ids.tolist()
    mask = attention_mask.bool()
    return [ids[m].tolist() for ids, m in zip(input_ids, mask, strict=True)]
