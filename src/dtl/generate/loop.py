"""Sampling from a TransformerLM: the spec's "Generation Process", with a KV cache.

Each step takes the last position's logits -> repetition penalty (CTRL) -> temperature ->
top-k -> top-p -> a multinomial draw (temperature 0 = greedy argmax), appends the token and
feeds only that token through the model again: the KV cache holds the keys and values of
everything before, and only the last position goes through the vocabulary head.

Token level (bring your own tokenizer):

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100)).eval()
>>> out = generate_tokens(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5, temperature=0)
>>> out.shape  # the prompt followed by 5 new tokens
torch.Size([1, 8])

Text level (`generate`, `stream`, `stream_batch`) adds the tokenizer, stop strings and
UTF-8-safe streaming.

Context length: a prompt never runs the model past its `max_seq_length`. When
prompt + max_new_tokens does not fit, the prompt is left-truncated (its oldest tokens are
dropped) so that it does, unless `truncate=False`, which raises a DtlError instead.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dtl.errors import DtlError
from dtl.generate.decode import DecodePlan, decode_step, plan_if_fast


@dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen. `temperature=0` means greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise DtlError(f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DtlError(f"top_k must be a positive integer (or None for all), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise DtlError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0.0:
            raise DtlError(
                f"repetition_penalty must be > 0 (1 = off, 1.2 is typical), "
                f"got {self.repetition_penalty}"
            )


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


def filter_top_k(logits: Tensor, k: int | None) -> Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept), -inf the rest."""
    if k is None or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens
    whose probabilities sum to at least p; the most likely token is always kept."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor, opts: SamplingOptions, seen: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """logits (B, V) -> next token ids (B,).

    With top-k the draw is made among the k candidates only (`torch.topk` returns them
    sorted, which top-p needs): the same distribution as masking the full vocabulary, but a
    softmax and multinomial over 50 values instead of 50,257 (that was a third of the time
    of a small model's decode step).
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, opts.repetition_penalty)
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
    probs = torch.softmax(values, dim=-1)
    return values.masked_fill(probs.cumsum(-1) - probs >= p, float("-inf"))


# ---------------------------------------------------------------------- the head
def last_logits(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache,
    plan: DecodePlan | None = None,
) -> Tensor:
    """The next-token logits (B, V) after `input_ids`: only the last position goes through
    the vocabulary head (equal to `model(..., last_only=True)[:, -1]`). With a `DecodePlan`
    (CPU models, `dtl.generate.decode`) the head, and each one-token step through the cache, run on
    weights laid out for memory speed; the loop gets the plan once, not every step."""
    if plan is None:
        return model(input_ids, attention_mask, cache=cache, last_only=True)[:, -1]
    if cache is not None and input_ids.size(1) == 1 and attention_mask is None:
        return decode_step(model, input_ids, cache, plan)
    hidden = model.hidden_states(input_ids, attention_mask, cache=cache)[:, -1]  # (B, d)
    return plan.head_for(model, hidden.size(0))(hidden)  # (B, V)


# ---------------------------------------------------------------------- the token loop
def fit_context(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    max_new_tokens: int,
    max_seq_length: int,
    truncate: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Left-truncate (B, T) prompts so T + max_new_tokens <= max_seq_length, or raise."""
    if max_new_tokens < 1:
        raise DtlError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= max_seq_length:
        raise DtlError(
            f"max_new_tokens ({max_new_tokens}) must be below the model's max_seq_length "
            f"({max_seq_length}) so that at least one prompt token fits"
        )
    room = max_seq_length - max_new_tokens
    if input_ids.size(1) <= room:
        return input_ids, attention_mask
    if not truncate:
        raise DtlError(
            f"prompt of {input_ids.size(1)} tokens + {max_new_tokens} new tokens exceeds the "
            f"model's max_seq_length ({max_seq_length}); shorten the prompt or max_new_tokens"
        )
    mask = None if attention_mask is None else attention_mask[:, -room:]
    if mask is not None and bool((mask.sum(1) == 0).any()):
        raise DtlError("after left-truncation a prompt has no tokens left; shorten the padding")
    return input_ids[:, -room:], mask


def seeded_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The generator a row group draws from: seeded, or None for torch's global one."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def context_tokens(input_ids: Tensor, attention_mask: Tensor | None, vocab_size: int) -> Tensor:
    """(B, V) bool: True where a token occurs in the row's (unpadded) prompt, which the
    repetition penalty then keeps up to date with each new token."""
    B, T = input_ids.shape
    seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=input_ids.device)
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else (
        attention_mask.bool()
    )  # fmt: skip
    seen[torch.arange(B, device=input_ids.device)[:, None].expand(B, T)[valid],
         input_ids[valid]] = True  # fmt: skip
    return seen


@torch.no_grad()
def iter_tokens(
    model: torch.nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    opts: SamplingOptions | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    attention_mask: Tensor | None = None,
    done: Tensor | None = None,
    groups: Sequence[tuple[Sequence[int], SamplingOptions]] | None = None,
) -> Iterator[Tensor]:
    """Yield the next token ids (B,) once per step, at most max_new_tokens times.

    The prompt must already fit (see `fit_context`). Rows that produced `eos_id`, or that the
    caller marked in `done` (a (B,) bool tensor it may set between steps, e.g. on a stop
    string), keep yielding `eos_id` (or 0) as padding; the loop ends when every row is done.
    `groups` [(rows, options), ...] lets rows of one batch sample differently
    (`stream_requests`): each group has its own options and seeded generator, so a group
    draws what it would draw alone. (The server, whose rows join and leave mid-run, does the
    same per request in `dtl.generate.batch`.)
    """
    B, T = input_ids.shape
    device = input_ids.device
    groups = [(range(B), opts or SamplingOptions())] if groups is None else groups
    samplers = []  # (row index or None for all rows, options, generator)
    for rows, o in groups:
        index = None if len(groups) == 1 else torch.tensor(list(rows), device=device)
        samplers.append((index, o, seeded_generator(o.seed, device)))
    done = torch.zeros(B, dtype=torch.bool, device=device) if done is None else done
    pad = 0 if eos_id is None else eos_id
    seen = None
    if any(o.repetition_penalty != 1.0 for _, o in groups):
        seen = context_tokens(input_ids, attention_mask, model.config.vocab_size)

    cache = model.allocate_cache(B, T + max_new_tokens) if use_cache else None
    ids, mask = input_ids, attention_mask  # the full context, for the no-cache path
    plan = plan_if_fast(model)  # once: the weights stay as they are from here on
    logits = last_logits(model, input_ids, attention_mask, cache, plan)  # (B, V)
    for _ in range(max_new_tokens):
        token = _sample_groups(logits, samplers, seen)  # (B,)
        token = torch.where(done, torch.full_like(token, pad), token)
        if seen is not None:
            seen[torch.arange(B, device=device), token] = True
        if eos_id is not None:
            done |= token == eos_id
        yield token
        if bool(done.all()):
            return
        step = token[:, None]  # (B, 1)
        if cache is not None:
            logits = last_logits(model, step, None, cache, plan)
        else:  # recompute the whole context: the reference the cache must equal
            ids = torch.cat([ids, step], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            logits = last_logits(model, ids, mask, None, plan)


def _sample_groups(logits: Tensor, samplers: list, seen: Tensor | None) -> Tensor:
    if len(samplers) == 1:
        _, o, g = samplers[0]
        return sample_next(logits, o, seen if o.repetition_penalty != 1.0 else None, g)
    token = torch.empty(logits.size(0), dtype=torch.long, device=logits.device)
    for index, o, g in samplers:
        row_seen = seen[index] if seen is not None and o.repetition_penalty != 1.0 else None
        token[index] = sample_next(logits[index], o, row_seen, g)
    return token


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
) -> Tensor:
    """Sample up to max_new_tokens after each prompt row; returns (B, T' + n) token ids.

    input_ids: (B, T), left-padded when rows differ in length, with attention_mask (B, T)
    of 1 (token) / 0 (padding). The result is the (possibly left-truncated, see the module
    docs) prompt followed by the new tokens; rows that stopped at `eos_id` are padded with it.
    Generation stops early once every row has produced `eos_id`.

    >>> generate_tokens(model, ids, max_new_tokens=20, top_k=50, seed=0)  # doctest: +SKIP
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    opts = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
    input_ids, attention_mask = fit_context(
        input_ids, attention_mask, max_new_tokens, model.config.max_seq_length, truncate
    )
    steps = list(
        iter_tokens(model, input_ids, max_new_tokens, opts, eos_id, use_cache, attention_mask)
    )
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


# ---------------------------------------------------------------------- text level
@dataclass
class Completion:
    """One prompt's result: the new text, its token ids and why it ended."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-text or a stop string) or "length"


@dataclass
class StreamChunk:
    """A piece of row `index`'s text; `finish_reason` is set on the row's last chunk."""

    index: int
    text: str
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)


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
        self, index: int, token: int, eos_id: int | None, max_new_tokens: int
    ) -> StreamChunk | None:
        """Push row `index`'s next token; the chunk to send, if any (the row's last one, with
        its finish_reason, at end-of-text, a stop string or max_new_tokens)."""
        piece = self.push(token, eos_id)
        if self.finished is None and len(self.ids) >= max_new_tokens:
            piece += self.finish("length")
        if self.finished is not None:
            return StreamChunk(index, piece, self.finished, list(self.ids))
        return StreamChunk(index, piece) if piece else None

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


def encode_prompts(
    tokenizer, prompts: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor | None]:
    """Left-pad the encoded prompts into (B, T) ids and mask (mask None when all equal)."""
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:  # an empty prompt starts from the end-of-text token, as GPT-2 does
            encoded[i] = [tokenizer.eos_id]
    T = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), T), tokenizer.eos_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, T - len(ids) :] = torch.tensor(ids)
        mask[i, T - len(ids) :] = 1
    all_full = bool(mask.all())
    return input_ids.to(device), (None if all_full else mask.to(device))


@dataclass
class Request:
    """One prompt's generation settings, for `stream_requests`."""

    prompt: str
    max_new_tokens: int = 64
    options: SamplingOptions = field(default_factory=SamplingOptions)
    stop: Sequence[str] = ()
    group: int = 0  # requests of one group share a seeded generator (n samples of a prompt)


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
) -> Iterator[StreamChunk]:
    """Generate for several prompts at once, yielding text pieces as they are decoded.

    Every row ends with exactly one chunk whose `finish_reason` is "stop" (end-of-text or a
    stop string; the stop string itself is not part of the text) or "length".

    >>> for chunk in stream_batch(model, tok, ["Once", "The"], 20):  # doctest: +SKIP
    ...     print(chunk.index, chunk.text)
    """
    if isinstance(stop, str):
        stop = [stop]
    opts = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
    requests = [Request(p, max_new_tokens, opts, stop) for p in prompts]
    yield from stream_requests(model, tokenizer, requests, use_cache, truncate, stop_at_eos)


def stream_requests(
    model: torch.nn.Module,
    tokenizer,
    requests: Sequence[Request],
    use_cache: bool = True,
    truncate: bool = True,
    stop_at_eos: bool = True,
    cancelled=None,
) -> Iterator[StreamChunk]:
    """`stream_batch` where each row has its own settings, all starting together (the
    server's rows, which join a running batch, go through `dtl.generate.batch` instead).

    The rows share one padded batch, so its longest prompt plus its largest max_new_tokens
    must fit the context. `cancelled(i)`, if given, is asked after each step;
    a row it says True for is dropped without a final chunk.
    """
    if not requests:
        raise DtlError("no prompts given: pass at least one prompt")
    device = next(model.parameters()).device
    context = model.config.max_seq_length
    input_ids, mask = encode_prompts(tokenizer, [r.prompt for r in requests], device)
    steps = max(r.max_new_tokens for r in requests)
    input_ids, mask = fit_context(input_ids, mask, steps, context, truncate)
    eos_id = tokenizer.eos_id if stop_at_eos else None
    rows = [RowText(tokenizer, [r.stop] if isinstance(r.stop, str) else r.stop)
            for r in requests]  # fmt: skip
    by_group: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        by_group.setdefault(r.group, []).append(i)
    groups = [(index, requests[index[0]].options) for index in by_group.values()]
    done = torch.zeros(len(requests), dtype=torch.bool, device=device)
    for step in iter_tokens(model, input_ids, steps, None, eos_id, use_cache, mask, done,
                            groups):  # fmt: skip
        for i, token in enumerate(step.tolist()):
            row = rows[i]
            if row.finished is not None:
                continue
            if cancelled is not None and cancelled(i):
                row.finished = "cancelled"
                done[i] = True
                continue
            chunk = row.advance(i, token, eos_id, requests[i].max_new_tokens)
            if row.finished is not None:
                done[i] = True
            if chunk is not None:
                yield chunk
    for i, row in enumerate(rows):  # rows that ran out of new tokens
        if row.finished is None:
            yield StreamChunk(i, row.finish("length"), "length", list(row.ids))


def prompt_lengths(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Prompt token counts as the model sees them (an empty prompt is one end-of-text)."""
    return [max(1, len(tokenizer.encode(p))) for p in prompts]


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
) -> list[Completion]:
    """Complete each prompt; returns one `Completion` (text, token_ids, finish_reason) each.

    >>> [c.text for c in generate(model, tok, ["Question: Who?\\nAnswer:"], 32,
    ...                           temperature=0, stop=["\\nQuestion:"])]  # doctest: +SKIP
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [""] * len(prompts)
    results: list[Completion | None] = [None] * len(prompts)
    lengths = prompt_lengths(tokenizer, prompts)
    for chunk in stream_batch(
        model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, stop, seed, use_cache, truncate,
    ):  # fmt: skip
        texts[chunk.index] += chunk.text
        if chunk.finish_reason is not None:
            n = min(lengths[chunk.index], model.config.max_seq_length - max_new_tokens)
            results[chunk.index] = Completion(
                texts[chunk.index], chunk.token_ids, n, chunk.finish_reason
            )
    return results  # type: ignore[return-value]


def stream(model: torch.nn.Module, tokenizer, prompt: str, **kwargs) -> Iterator[str]:
    """Yield one prompt's completion as text pieces (never a broken UTF-8 character).

    Takes `generate`'s keyword options.

    >>> for piece in stream(model, tok, "Once upon a time", max_new_tokens=50):  # doctest: +SKIP
    ...     print(piece, end="", flush=True)
    """
    for chunk in stream_batch(model, tokenizer, [prompt], **kwargs):
        if chunk.text:
            yield chunk.text
