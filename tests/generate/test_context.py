"""The one context rule (`dtl.generate.context.fit_context`) against hand-computed cases and
the properties that define it, and `fit_request`, which applies it to a request (its prompts
tokenized once)."""

from __future__ import annotations

import pytest
import torch

from dtl import DtlError, ModelConfig, TransformerLM
from dtl.generate import Fit, Request, SamplingOptions, fit_context, fit_request, generate
from dtl.generate.context import fits


@pytest.mark.parametrize(
    "prompt, max_new, fit",
    [
        # shorter than the context, and the answer fits: nothing changes
        (10, 20, Fit(10, 20, dropped=0, cut=0, context=64)),
        (10, 54, Fit(10, 54, dropped=0, cut=0, context=64)),  # exactly
        # shorter, the answer does not fit: max_new_tokens cut to the room, 64 - 10
        (10, 64, Fit(10, 54, dropped=0, cut=10, context=64)),
        (63, 5, Fit(63, 1, dropped=0, cut=4, context=64)),  # room for one
        # equal to the context: its first token goes, one new token fits
        (64, 5, Fit(63, 1, dropped=1, cut=4, context=64)),
        (64, 1, Fit(63, 1, dropped=1, cut=0, context=64)),
        # longer: its last 63 tokens and one new one
        (100, 64, Fit(63, 1, dropped=37, cut=63, context=64)),
        # max_new_tokens 0 (scoring the prompt): it may fill the context exactly
        (10, 0, Fit(10, 0, dropped=0, cut=0, context=64)),
        (64, 0, Fit(64, 0, dropped=0, cut=0, context=64)),
        (70, 0, Fit(64, 0, dropped=6, cut=0, context=64)),
    ],
)
def test_the_rule_by_hand(prompt, max_new, fit):
    assert fit_context(prompt, max_new, 64) == fit
    assert fit.prompt_tokens + fit.max_new_tokens <= 64


def test_truncate_false_refuses_only_a_prompt_that_leaves_no_room():
    assert fit_context(10, 64, 64, truncate=False) == Fit(10, 54, cut=10, context=64)  # cut
    with pytest.raises(DtlError) as info:
        fit_context(64, 5, 64, truncate=False)
    assert str(info.value) == ("the prompt is 64 tokens but the model's context is 64, with no "
                               "room left to generate; shorten the prompt")  # fmt: skip
    assert fit_context(64, 0, 64, truncate=False).prompt_tokens == 64  # scoring: it fits
    with pytest.raises(DtlError, match="^the prompt is 65 tokens but the model's context is 64; "):
        fit_context(65, 0, 64, truncate=False)


@pytest.mark.parametrize(
    "prompt, max_new, context, message",
    [
        (0, 5, 64, "at least one token"),
        (3, -1, 64, "max_new_tokens must be at least 0"),
        (1, 1, 1, "context is 1 tokens: too short"),
    ],
)
def test_impossible_inputs_are_one_clear_error(prompt, max_new, context, message):
    with pytest.raises(DtlError, match=message):
        fit_context(prompt, max_new, context)


def test_the_rule_over_every_small_case():
    """What defines the rule, checked for every prompt length and max_new_tokens up to 2.5x a
    context of 16: both fit; at least one new token (when any is asked); the prompt is whole
    unless it alone leaves no room for that one; the answer is whole unless the two do not
    fit, and then the context is filled exactly."""
    C = 16
    for prompt in range(1, 40):
        for max_new in range(0, 40):
            f = fit_context(prompt, max_new, C)
            least = min(max_new, 1)
            assert f.prompt_tokens + f.max_new_tokens <= C
            assert f.max_new_tokens >= least and f.max_new_tokens <= max_new
            assert f.dropped == max(0, prompt + least - C) == prompt - f.prompt_tokens
            assert f.cut == max_new - f.max_new_tokens
            if prompt + max_new <= C:
                assert (f.prompt_tokens, f.max_new_tokens) == (prompt, max_new)
                assert fits(prompt, max_new, C) and f.note() is None
            else:
                assert f.prompt_tokens + f.max_new_tokens == C
                assert not fits(prompt, max_new, C) and f.note() is not None


def test_the_note_says_what_was_cut():
    assert fit_context(12, 64, 64).note() == (
        "max_new_tokens cut from 64 to 52: the model's context is 64 tokens and the prompt "
        "takes 12")  # fmt: skip
    assert fit_context(70, 64, 64).note() == (
        "the prompt's first 7 of 70 tokens are dropped and max_new_tokens cut from 64 to 1: "
        "the model's context is 64 tokens")  # fmt: skip
    assert fit_context(70, 1, 64).note() == (
        "the prompt's first 7 of 70 tokens are dropped: the model's context is 64 tokens")
    assert fit_context(12, 8, 64).note() is None


class CountingTokenizer:
    """A tokenizer that counts its encode calls: one word, one token."""

    eos_id = 0
    vocab_size = 97

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [1 + len(word) % 90 for word in text.split()]

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(b" w%d" % i for i in ids)


def test_fit_request_encodes_once_and_cuts_the_request():
    tok = CountingTokenizer()
    request = Request(["one two three", " ".join(["w"] * 20)], SamplingOptions(max_new_tokens=8))
    fit = fit_request(request, tok, context=16)
    assert tok.calls == 2  # each prompt once
    assert fit == Fit(15, 1, dropped=5, cut=7, context=16)  # the longest (20) decides
    assert request.fit is fit and request.options.max_new_tokens == 1
    assert request.prompt_ids == [[4, 4, 6], [2] * 15]  # the short one is whole
    assert fit_request(request, tok, context=16) is fit and tok.calls == 2  # not again


def test_generate_tokenizes_each_prompt_once_and_cuts_to_the_room():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=97, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                      max_seq_length=16)).eval()  # fmt: skip
    tok = CountingTokenizer()
    done = generate(model, tok, ["a b c", "d e f g h"], 64, temperature=0)
    assert tok.calls == 2
    assert [c.prompt_tokens for c in done] == [3, 5]
    assert [len(c.token_ids) for c in done] == [11, 11]  # 64 cut to 16 - 5, from the longest
    assert {c.finish_reason for c in done} == {"length"}
    assert done[0].fit.note() == ("max_new_tokens cut from 64 to 11: the model's context is 16 "
                                  "tokens and the prompt takes 5")  # fmt: skip


def test_dtl_chat_leaves_out_the_oldest_turns_whole():
    from dtl.cli.generate import fit_chat_history

    tok = CountingTokenizer()  # one word, one token
    history = ["Question: a\nAnswer: b", "Question: c d\nAnswer: e", "Question: f\nAnswer: g"]
    # 4 + 5 + 4 turn tokens, 3 of the question's prompt: with 5 new tokens only the last
    # turn fits 16 (7 + 5), so the oldest two go
    prompt, ids, left_out = fit_chat_history(tok, history, "h", 5, 16)
    assert left_out == 2 and prompt == "Question: f\nAnswer: g\nQuestion: h\nAnswer:"
    assert len(ids) == 7
    assert fit_chat_history(tok, history, "h", 0, 16)[2] == 0  # all 16 fit
    assert fit_chat_history(tok, history, "h", 20, 16)[2] == 3  # none: the rule cuts the answer
