"""dtl.generate.batch: requests that join and leave a running batch get what they get alone."""

from __future__ import annotations

import torch

from dtl import ModelConfig, TransformerLM
from dtl.generate import SamplingOptions, generate
from dtl.generate.batch import ContinuousBatch, Join


def peaky_model(context: int = 96) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=context)  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():  # peaky logits: greedy text is varied, not a run of one token
        model.head.weight.mul_(30)
    return model


# (prompts, max_new_tokens, options, stop): n > 1 rows, seeded sampling with top-k and top-p,
# the repetition penalty, a stop string, greedy; prompts of different lengths
REQUESTS = {
    "a": (["Once upon a time"] * 2, 12, SamplingOptions(1.0, 40, None, 1.0, 7), ()),
    "b": (["The history of the Normans in Italy begins with a long story of"], 9,
          SamplingOptions(0.8, None, 0.9, 1.3, 11), ()),
    "c": (["Hi", "A much longer second prompt of this request"], 7,
          SamplingOptions(0.0, None, None, 1.0, None), ("e",)),
}  # fmt: skip


def alone(model, tokenizer, key):
    prompts, n, o, stop = REQUESTS[key]
    return [c.text for c in generate(model, tokenizer, prompts, n, o.temperature, o.top_k,
                                     o.top_p, o.repetition_penalty, list(stop), o.seed)]  # fmt: skip


def test_members_joining_a_running_batch_get_what_they_get_alone(gpt2):
    model = peaky_model()
    batch = ContinuousBatch(model, gpt2, max_rows=16)
    texts = {k: [""] * len(REQUESTS[k][0]) for k in REQUESTS}
    finished = {k: 0 for k in REQUESTS}

    def step():
        for key, chunk in batch.step():
            texts[key][chunk.index] += chunk.text
            finished[key] += chunk.finish_reason is not None

    batch.add("a", *REQUESTS["a"])
    for _ in range(3):  # "a" is 3 tokens in when the longer "b" joins: "a" is left-padded
        step()
    batch.add("b", *REQUESTS["b"])
    step()
    batch.add("c", *REQUESTS["c"])  # a shorter one: "c" is left-padded
    assert batch.n_rows == 5
    while batch:
        step()
    for key, (prompts, *_rest) in REQUESTS.items():
        assert finished[key] == len(prompts)  # every row ended exactly once
        assert texts[key] == alone(model, gpt2, key), key
    assert batch.cache is None  # all left: nothing is held


def test_members_prefilled_together_get_what_they_get_alone(gpt2):
    """A burst: all three requests in one padded prefill (rows of different lengths)."""
    model = peaky_model()
    batch = ContinuousBatch(model, gpt2, max_rows=16)
    batch.add_many([Join(k, p, n, o, list(stop)) for k, (p, n, o, stop) in REQUESTS.items()])
    texts = {k: [""] * len(REQUESTS[k][0]) for k in REQUESTS}
    while batch:
        for key, chunk in batch.step():
            texts[key][chunk.index] += chunk.text
    for key in REQUESTS:
        assert texts[key] == alone(model, gpt2, key), key


def test_finished_members_leave_and_the_cache_shrinks(gpt2):
    model = peaky_model()
    batch = ContinuousBatch(model, gpt2)
    long_prompt, short_prompt = "word " * 40, "Hi"
    assert len(gpt2.encode(short_prompt)) == 1
    batch.add("long", [long_prompt], 2, SamplingOptions(temperature=0.0))
    batch.add("short", [short_prompt], 6, SamplingOptions(temperature=0.0))
    assert batch.cache.length == len(gpt2.encode(long_prompt))  # "Hi" right-aligned to it
    batch.step()
    batch.step()  # "long" is done
    assert [m.key for m in batch.members] == ["short"]
    assert batch.cache.batch_size == 1 and batch.cache.length == 3  # "Hi" + 2 tokens


def test_fits_keeps_every_member_inside_the_context(gpt2):
    model = peaky_model(context=64)
    batch = ContinuousBatch(model, gpt2, max_rows=4)
    batch.add("a", ["Hi"], 50, SamplingOptions())
    assert batch.fits(1, 10, 10)
    assert not batch.fits(1, 20, 10)  # 20 slots + the 50 "a" may still draw > 64
    assert not batch.fits(4, 2, 2)  # 1 + 4 rows > max_rows
    empty = ContinuousBatch(model, gpt2, max_rows=4)
    assert empty.fits(8, 10, 10)  # alone, a request may be larger than max_rows
