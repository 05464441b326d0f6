"""Log-probabilities of tokens under the model: of each drawn token as generation goes
(`step_logprobs`), and of a prompt's own tokens (`prompt_logprobs`, what the server's
`echo` returns and lm-evaluation-harness sums to score a continuation).

Both are the model's distribution: log_softmax of the raw logits, before logit bias,
penalties, temperature, top-k or top-p (as vLLM reports them by default), so a figure does
not depend on how the token was drawn.

>>> import torch
>>> from dtl import ModelConfig, TransformerLM
>>> model = TransformerLM(ModelConfig.preset("tiny", vocab_size=100)).eval()
>>> scores = prompt_logprobs(model, [5, 7, 9], top_n=2)
>>> scores[0] is None, scores[1].token, len(scores[1].top)  # the first token has no context
(True, 7, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position, as
    (token id, log-probability) pairs, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def step_logprobs(logits: Tensor, tokens: Tensor, top_n: int) -> list[TokenLogprob]:
    """logits (B, V) at one position per row, tokens (B,) chosen there -> B `TokenLogprob`s.
    The chosen token's figure and the top ones come from one log_softmax, so a greedy token's
    logprob equals the top one exactly (lm-evaluation-harness compares them with `==`)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logprobs.gather(-1, tokens.long()[:, None])[:, 0].tolist()  # (B,)
    k = min(top_n, logprobs.size(-1))
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    out = []
    for t, lp, vals, top_ids in zip(tokens.tolist(), chosen, values.tolist(), ids.tolist(),
                                     strict=True):  # fmt: skip
        out.append(TokenLogprob(t, lp, list(zip(top_ids, vals, strict=True))))
    return out


@torch.no_grad()
def prompt_logprobs(
    model: torch.nn.Module, ids: list[int], top_n: int
) -> list[TokenLogprob | None]:
    """Each token of `ids` scored given the tokens before it (one forward of the whole row);
    the first has nothing before it, so it is None, as in OpenAI's `echo`."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device))[0, :-1]  # (T-1, V): t predicts t+1
    if not len(ids) > 1:
        return [None] * len(ids)
    return [None, *step_logprobs(logits, torch.tensor(ids[1:], device=device), top_n)]
