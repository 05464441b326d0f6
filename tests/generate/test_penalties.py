"""OpenAI's presence/frequency penalties and logit_bias in the sampler, against hand-computed
figures, and in the token loop against a plain re-implementation (the prompt does not count;
each generated token does, once per time it was drawn)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dtl import ModelConfig, TransformerLM
from dtl.errors import DtlError
from dtl.generate import generate_tokens
from dtl.generate.sampling import (
    PenaltyState,
    SamplingOptions,
    apply_logit_bias,
    apply_presence_frequency,
    sample_next,
)


def test_presence_and_frequency_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.75)
    # token 1: 2 - 0.5 - 2 * 0.75 = 0; token 2: 3 - 0.5 - 0.75 = 1.75; unseen tokens unchanged
    assert out.tolist() == [[1.0, 0.0, 1.75, 0.5]]
    negative = apply_presence_frequency(logits, counts, presence=-1.0, frequency=0.0)
    assert negative.tolist() == [[1.0, 3.0, 4.0, 0.5]]  # a negative penalty favours repeats


def test_logit_bias_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    out = apply_logit_bias(logits, ((0, 5.0), (3, -100.0)))
    assert out.tolist() == [[6.0, 2.0, 3.0, -99.5], [5.0, 0.0, 0.0, -100.0]]


def test_sample_next_applies_them_before_the_greedy_pick():
    logits = torch.tensor([[0.0, 3.0, 2.9]])
    counts = torch.tensor([[0.0, 1.0, 0.0]])
    plain = SamplingOptions(temperature=0)
    assert sample_next(logits, plain, PenaltyState(counts=counts), None).item() == 1
    freq = SamplingOptions(temperature=0, frequency_penalty=0.2)  # 3.0 - 0.2 = 2.8 < 2.9
    assert sample_next(logits, freq, PenaltyState(counts=counts), None).item() == 2
    biased = SamplingOptions(temperature=0, logit_bias={"0": 3.5})  # JSON keys are strings
    assert biased.logit_bias == ((0, 3.5),)
    assert sample_next(logits, biased, None, None).item() == 0


def test_penalty_state_by_hand():
    """One home for what the penalties remember: set up from the (left-padded) prompts,
    updated with each draw (a finished row's padding is no generated token), applied in the
    sampler's order: repetition, presence/frequency, no-repeat n-grams."""
    opts = SamplingOptions(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0,
                           no_repeat_ngram_size=2)  # fmt: skip
    ids, mask = torch.tensor([[0, 1, 2], [3, 3, 1]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    state = PenaltyState.start(opts, ids, mask, vocab_size=5)
    assert state.seen.tolist() == [[False, True, True, False, False],
                                   [False, True, False, True, False]]  # fmt: skip
    assert state.history == [[1, 2], [3, 3, 1]] and state.counts.sum() == 0
    state.update(torch.tensor([4, 3]), live=torch.tensor([True, False]))
    assert state.counts.tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert state.history == [[1, 2, 4], [3, 3, 1, 3]]
    out = state.apply(torch.tensor([[1.0, 2, 3, 4, 5], [1.0, 2, 3, 4, 5]]), opts)
    inf = float("-inf")
    # row 0: 1, 2, 4 seen (halved), 4 drawn once (-1); row 1: 1 and 3 seen, and "3 ->" was
    # followed by 3 and by 1 before: both banned
    assert out.tolist() == [[1.0, 1.0, 1.5, 4.0, 1.5], [1.0, inf, 3.0, inf, 5.0]]
    assert PenaltyState.start(SamplingOptions(), ids, mask, vocab_size=5) is None  # all off


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logprobs": -1}, "logprobs"),
    ],
)
def test_options_refuse_out_of_range_values(kwargs, words):
    with pytest.raises(DtlError, match=words):
        SamplingOptions(**kwargs)


def test_the_loop_counts_generated_tokens_only():
    """Greedy with a frequency penalty, token by token against a full forward each step and a
    Counter of the tokens drawn so far (the prompt's tokens are not counted)."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.preset("tiny", vocab_size=50)).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # peaky: the penalty has to fight real preferences
    prompt = [3, 3, 7, 3]
    opts = dict(temperature=0, max_new_tokens=12)
    for presence, frequency in ((0.0, 0.0), (0.3, 1.5), (2.0, 0.0)):
        got = generate_tokens(model, torch.tensor([prompt]), options=SamplingOptions(
            **opts, presence_penalty=presence, frequency_penalty=frequency))  # fmt: skip
        seq, drawn = list(prompt), Counter()
        with torch.no_grad():
            for _ in range(12):
                logits = model(torch.tensor([seq]))[0, -1].clone()
                for token, c in drawn.items():
                    logits[token] -= presence + frequency * c
                token = int(logits.argmax())
                drawn[token] += 1
                seq.append(token)
        assert got[0].tolist() == seq, (presence, frequency)
    plain = generate_tokens(model, torch.tensor([prompt]), options=SamplingOptions(**opts))
    assert plain[0, 4:].unique().numel() < got[0, 4:].unique().numel()  # it did change things
