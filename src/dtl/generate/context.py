"""Does a prompt and its answer fit the model's context: the one rule every path calls
(`generate_tokens`, `generate` / `stream`, `dtl generate` / `ask` / `chat`, `dtl eval`, the
server's completions and chat, and continuous batching's "can this request join now").

The context is `model.config.context`, the tokens per row the model trained at: positions
past it were never trained. A prompt of `prompt_len` tokens asking for `max_new_tokens`:

1. prompt + max_new_tokens fits: nothing changes;
2. else, while the prompt leaves room for at least one new token: max_new_tokens is cut to
   that room (the answer then ends with finish_reason "length");
3. else (the prompt alone fills the context): its oldest tokens are dropped so that one new
   token fits, or, with `truncate=False` (the server, or a caller who asks), a DtlError.

`max_new_tokens=0` (the server scoring a prompt with `echo`) needs no room: a prompt may fill
the context exactly.

>>> fit_context(10, 64, 64)  # the room left: 54 new tokens
Fit(prompt_tokens=10, max_new_tokens=54, dropped=0, cut=10, context=64)
>>> fit_context(70, 64, 64).note()
"the prompt's first 7 of 70 tokens are dropped and max_new_tokens cut from 64 to 1: the model's context is 64 tokens"
"""

from __future__ import annotations

from dataclasses import dataclass

from dtl.errors import DtlError


@dataclass(frozen=True)
class Fit:
    """What a prompt and its answer become in the context: the prompt's last `prompt_tokens`
    tokens (its first `dropped` are gone) and at most `max_new_tokens` new ones (`cut` fewer
    than asked)."""

    prompt_tokens: int
    max_new_tokens: int
    dropped: int = 0
    cut: int = 0
    context: int = 0

    @property
    def asked(self) -> int:
        """The max_new_tokens asked for."""
        return self.max_new_tokens + self.cut

    def note(self) -> str | None:
        """One line saying what was cut to fit, or None when nothing was.

        >>> fit_context(12, 64, 64).note()
        "max_new_tokens cut from 64 to 52: the model's context is 64 tokens and the prompt takes 12"
        """
        said = []
        if self.dropped:
            total = self.prompt_tokens + self.dropped
            said.append(f"the prompt's first {self.dropped} of {total} tokens are dropped")
        if self.cut:
            said.append(f"max_new_tokens cut from {self.asked} to {self.max_new_tokens}")
        if not said:
            return None
        why = f"the model's context is {self.context} tokens"
        if not self.dropped:
            why += f" and the prompt takes {self.prompt_tokens}"
        return " and ".join(said) + ": " + why


def fits(prompt_len: int, max_new_tokens: int, context: int) -> bool:
    """Whether `prompt_len` tokens and `max_new_tokens` new ones fit `context` as they are."""
    return prompt_len + max_new_tokens <= context


def fit_context(
    prompt_len: int, max_new_tokens: int, context: int, truncate: bool = True
) -> Fit:
    """The rule (see the module docs): how a prompt of `prompt_len` tokens (the longest of a
    request's rows) and `max_new_tokens` fit `context`. Raises a DtlError when the prompt
    alone fills the context and `truncate` is False.

    >>> fit_context(10, 20, 64)  # fits
    Fit(prompt_tokens=10, max_new_tokens=20, dropped=0, cut=0, context=64)
    >>> fit_context(64, 5, 64)  # the prompt fills it: its first token goes, one new token fits
    Fit(prompt_tokens=63, max_new_tokens=1, dropped=1, cut=4, context=64)
    """
    if prompt_len < 1:
        raise DtlError(f"a prompt has at least one token (an empty one is end-of-text), "
                       f"got {prompt_len}")  # fmt: skip
    if max_new_tokens < 0:
        raise DtlError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
    least = min(max_new_tokens, 1)  # a new token must fit, unless none is asked for
    if context <= least:
        raise DtlError(f"the model's context is {context} tokens: too short to hold a prompt "
                       "token and a new one")  # fmt: skip
    if fits(prompt_len, max_new_tokens, context):
        return Fit(prompt_len, max_new_tokens, context=context)
    room = context - prompt_len
    if room >= least:  # cut the answer to the room the prompt leaves
        return Fit(prompt_len, room, cut=max_new_tokens - room, context=context)
    if not truncate:
        raise DtlError(
            f"the prompt is {prompt_len} tokens but the model's context is {context}"
            + (", with no room left to generate" if max_new_tokens else "")
            + "; shorten the prompt"
        )
    keep = context - least  # the prompt's last tokens, and room for one new one
    return Fit(keep, least, dropped=prompt_len - keep, cut=max_new_tokens - least,
               context=context)  # fmt: skip
