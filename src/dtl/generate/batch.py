"""Continuous batching: the server's requests join a running decode batch between two steps
and leave it when they finish, so a new request waits for one step, not for a whole batch.

Each request ("member": its prompts x n rows) is prefilled with those that arrived with it
(one padded forward: a burst of clients waits for one prefill, not one each), and its cache
is merged into the batch's (`KVCache.merge`: rows right-aligned at the longest length, the
shorter ones left-padded and masked; positions count real tokens, so padding changes
nothing but float rounding). Every step samples each member's rows with the member's own
options and seeded generator, and finished rows keep drawing (and are fed padding) until the
whole member is done, just as they do alone: what a request gets does not depend on its
neighbours.

>>> batch = ContinuousBatch(model, tokenizer, max_rows=16)  # doctest: +SKIP
>>> batch.add("a", ["Once upon a time"], max_new_tokens=20, options=SamplingOptions())
>>> while batch:
...     for key, item in batch.step():  # a StreamChunk, or the Exception a member failed with
...         print(key, item.text)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dtl.generate import loop as gen
from dtl.generate.decode import plan_if_fast
from dtl.generate.loop import RowText, SamplingOptions, StreamChunk
from dtl.model.transformer import KVCache


@dataclass
class Join:
    """A request about to join: its key, rows (prompts x n) and settings."""

    key: Hashable
    prompts: list[str]
    max_new_tokens: int
    options: SamplingOptions
    stop: list[str] = field(default_factory=list)


@dataclass
class Member:
    """One request's rows in the batch, in order."""

    key: Hashable
    options: SamplingOptions
    generator: torch.Generator | None
    rows: list[RowText]
    max_new_tokens: int
    logits: Tensor  # (n, V): the next-token logits of its rows
    seen: Tensor | None  # (n, V) bool, for the repetition penalty
    done: Tensor  # (n,) bool
    steps: int = 0  # tokens drawn so far

    @property
    def finished(self) -> bool:
        return all(r.finished is not None for r in self.rows)


class ContinuousBatch:
    """Rows decoded together one token per step, joining and leaving between steps."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_rows: int = 16) -> None:
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.members: list[Member] = []
        self.cache: KVCache | None = None
        self.eos_id = tokenizer.eos_id
        self.plan = None

    def __len__(self) -> int:
        return len(self.members)

    @property
    def n_rows(self) -> int:
        return sum(len(m.rows) for m in self.members)

    def _room_needed(self, extra: int = 0) -> int:
        """Free slots the batch must keep: the most tokens any member may still draw."""
        return max([extra] + [m.max_new_tokens - m.steps for m in self.members])

    def fits(self, n_rows: int, longest_prompt: int, max_new_tokens: int) -> bool:
        """Whether a request of these sizes can join now (rows and context both)."""
        if self.n_rows + n_rows > self.max_rows and self.members:
            return False
        length = max(longest_prompt, self.cache.length if self.cache is not None else 0)
        return length + self._room_needed(max_new_tokens) <= self.model.config.max_seq_length

    def add(
        self,
        key: Hashable,
        prompts: Sequence[str],
        max_new_tokens: int,
        options: SamplingOptions,
        stop: Sequence[str] = (),
    ) -> None:
        """Prefill `prompts` alone and merge them into the batch (raises on a bad request,
        leaving the batch as it was)."""
        self.add_many([Join(key, list(prompts), max_new_tokens, options, list(stop))])

    @torch.no_grad()
    def add_many(self, joins: Sequence[Join]) -> None:
        """Prefill several requests as one padded batch (one forward instead of one each:
        what a burst of clients waits for), then merge them in. Raises if any fails, leaving
        the batch as it was; the caller may then add them one at a time."""
        model = self.model
        device = next(model.parameters()).device
        prompts = [p for j in joins for p in j.prompts]
        longest_new = max(j.max_new_tokens for j in joins)
        ids, mask = gen.encode_prompts(self.tokenizer, prompts, device)
        ids, mask = gen.fit_context(ids, mask, longest_new, model.config.max_seq_length,
                                    truncate=False)  # fmt: skip
        if self.plan is None or not self.members:  # weights may have changed between batches
            self.plan = plan_if_fast(model)
        cache = model.allocate_cache(ids.size(0), ids.size(1))
        logits = gen.last_logits(model, ids, mask, cache, self.plan)  # (rows, V)
        members, row = [], 0
        for j in joins:
            rows = slice(row, row + len(j.prompts))
            row = rows.stop
            seen = None
            if j.options.repetition_penalty != 1.0:
                seen = gen.context_tokens(ids[rows], None if mask is None else mask[rows],
                                          model.config.vocab_size)  # fmt: skip
            members.append(Member(
                j.key, j.options, gen.seeded_generator(j.options.seed, device),
                [RowText(self.tokenizer, j.stop) for _ in j.prompts], j.max_new_tokens,
                logits[rows], seen, torch.zeros(len(j.prompts), dtype=torch.bool, device=device),
            ))  # fmt: skip
        caches = [cache] if self.cache is None else [self.cache, cache]
        self.cache = KVCache.merge(caches, self._room_needed(longest_new))
        self.members += members

    def drop(self, key: Hashable) -> None:
        """Take a member out (its client left); the others go on."""
        self._keep([m for m in self.members if m.key != key])

    def clear(self) -> None:
        self.members, self.cache = [], None

    @torch.no_grad()
    def step(self) -> list[tuple[Hashable, StreamChunk | Exception]]:
        """Draw one token for every row; return what each member gets, with its key: text
        pieces (a row's last piece has its finish_reason), or the Exception it failed with.

        Never raises: a member whose draw fails (say, NaN logits) fails alone, and should
        the batch's forward fail, every member still in it gets the error, after the pieces
        already drawn. Finished and failed members leave the batch."""
        out: list[tuple[Hashable, StreamChunk | Exception]] = []
        pad = self.eos_id if self.eos_id is not None else 0
        tokens: dict[int, Tensor] = {}  # id(member) -> its rows' tokens, for those that go on
        for m in self.members:
            try:
                token = gen.sample_next(m.logits, m.options, m.seen, m.generator)  # (n,)
            except Exception as err:
                out.append((m.key, err))
                continue
            token = torch.where(m.done, torch.full_like(token, pad), token)
            if m.seen is not None:
                m.seen[torch.arange(token.size(0)), token] = True
            m.steps += 1
            for i, t in enumerate(token.tolist()):
                row = m.rows[i]
                if row.finished is not None:
                    continue
                chunk = row.advance(i, t, self.eos_id, m.max_new_tokens)
                if row.finished is not None:
                    m.done[i] = True
                if chunk is not None:
                    out.append((m.key, chunk))
            if not m.finished:
                tokens[id(m)] = token
        self._keep([m for m in self.members if id(m) in tokens])
        if not self.members:
            return out
        step = torch.cat([tokens[id(m)] for m in self.members])[:, None]  # (B, 1)
        try:
            logits = gen.last_logits(self.model, step, None, self.cache, self.plan)  # (B, V)
        except Exception as err:
            out += [(m.key, err) for m in self.members]
            self.clear()
            return out
        row = 0
        for m in self.members:
            m.logits = logits[row : row + len(m.rows)]
            row += len(m.rows)
        return out

    def _keep(self, members: list[Member]) -> None:
        if len(members) == len(self.members):
            return
        if not members:
            self.clear()
            return
        kept = {id(m) for m in members}
        rows, row = [], 0
        for m in self.members:
            if id(m) in kept:
                rows.extend(range(row, row + len(m.rows)))
            row += len(m.rows)
        assert self.cache is not None
        self.cache = self.cache.select(torch.tensor(rows, device=self.cache.key_mask.device))
        self.members = members
