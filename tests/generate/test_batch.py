"""dtl.generate.batch: requests that join and leave a running batch get what they get alone."""

from __future__ import annotations

import torch

from dtl import ModelConfig, TransformerLM
from dtl.generate import ContinuousBatch, Request, SamplingOptions, generate


def peaky_model(context: int = 96) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50257, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_length=context
    )
    model = TransformerLM(config).eval()
    with torch.no_grad():  # peaky logits: greedy text is varied, not a run of one token
        model.head.weight.mul_(30)
    return model


# (prompts, options): n > 1 rows, seeded sampling with top-k and top-p, the repetition
# penalty, a stop string, greedy; prompts of different lengths
REQUESTS = {
    "a": (["Once upon a time"] * 2, SamplingOptions(1.0, 40, None, 1.0, 7, max_new_tokens=12)),
    "b": (
        ["The history of the Normans in Italy begins with a long story of"],
        SamplingOptions(0.8, None, 0.9, 1.3, 11, max_new_tokens=9),
    ),
    "c": (
        ["Hi", "A much longer second prompt of this request"],
        SamplingOptions(0.0, None, None, 1.0, None, max_new_tokens=7, stop=("e",)),
    ),
}


def request(key: str) -> Request:
    prompts, options = REQUESTS[key]
    return Request(list(prompts), options)


def alone(model, tokenizer, key):
    """The request's texts from `generate`'s keyword arguments, on its own."""
    prompts, o = REQUESTS[key]
    done = generate(model, tokenizer, prompts, o.max_new_tokens, o.temperature, o.top_k, o.top_p,
                    o.repetition_penalty, list(o.stop), o.seed)
    return [c.text for c in done]


def test_requests_joining_a_running_batch_get_what_they_get_alone(gpt2):
    model = peaky_model()
    batch = ContinuousBatch(model, gpt2, max_rows=16)
    requests = {k: request(k) for k in REQUESTS}
    key_of = {id(r): k for k, r in requests.items()}
    texts = {k: [""] * len(REQUESTS[k][0]) for k in REQUESTS}
    finished = {k: 0 for k in REQUESTS}

    def step():
        for r, chunk in batch.step():
            texts[key_of[id(r)]][chunk.index] += chunk.text
            finished[key_of[id(r)]] += chunk.finish_reason is not None

    batch.add([requests["a"]])
    for _ in range(3):  # "a" is 3 tokens in when the longer "b" joins: "a" is left-padded
        step()
    batch.add([requests["b"]])
    step()
    batch.add([requests["c"]])  # a shorter one: "c" is left-padded
    assert batch.n_rows == 5
    while batch:
        step()
    for key, (prompts, _) in REQUESTS.items():
        assert finished[key] == len(prompts)  # every row ended exactly once
        assert texts[key] == alone(model, gpt2, key), key
    assert batch.loop.cache is None  # all left: nothing is held


def test_requests_prefilled_together_get_what_they_get_alone(gpt2):
    """A burst: all three requests in one padded prefill (rows of different lengths)."""
    model = peaky_model()
    batch = ContinuousBatch(model, gpt2, max_rows=16)
    requests = {k: request(k) for k in REQUESTS}
    key_of = {id(r): k for k, r in requests.items()}
    batch.add(list(requests.values()))
    texts = {k: [""] * len(REQUESTS[k][0]) for k in REQUESTS}
    while batch:
        for r, chunk in batch.step():
            texts[key_of[id(r)]][chunk.index] += chunk.text
    for key in REQUESTS:
        assert texts[key] == alone(model, gpt2, key), key


def test_finished_requests_leave_and_the_cache_shrinks(gpt2):
    model = peaky_model()
    batch = ContinuousBatch(model, gpt2)
    long_prompt, short_prompt = "word " * 40, "Hi"
    assert len(gpt2.encode(short_prompt)) == 1
    long = Request([long_prompt], SamplingOptions(temperature=0.0, max_new_tokens=2))
    short = Request([short_prompt], SamplingOptions(temperature=0.0, max_new_tokens=6))
    batch.add([long])
    batch.add([short])
    assert batch.loop.cache.length == len(gpt2.encode(long_prompt))  # "Hi" right-aligned to it
    batch.step()
    batch.step()  # "long" is done
    assert batch.requests == [short]
    assert batch.loop.cache.batch_size == 1 and batch.loop.cache.length == 3  # "Hi" + 2 tokens


def test_fits_keeps_every_request_inside_the_context(gpt2):
    model = peaky_model(context=64)
    batch = ContinuousBatch(model, gpt2, max_rows=4)
    batch.add([Request(["Hi"], SamplingOptions(max_new_tokens=50))])

    def sized(rows: int, prompt: int, max_new: int) -> Request:
        return Request(["x"] * rows, SamplingOptions(max_new_tokens=max_new),
                       prompt_ids=[[1] * prompt] * rows)  # fmt: skip

    assert batch.fits([sized(1, 10, 10)])
    assert not batch.fits([sized(1, 20, 10)])  # 20 slots + the 50 "Hi" may still draw > 64
    assert not batch.fits([sized(1, 10, 10), sized(1, 20, 1)])  # together, no
    assert not batch.fits([sized(4, 2, 2)])  # 1 + 4 rows > max_rows
    empty = ContinuousBatch(model, gpt2, max_rows=4)
    assert empty.fits([sized(8, 10, 10)])  # alone, a request may be larger than max_rows
    assert not empty.fits([sized(4, 10, 10), sized(4, 10, 10)])  # but not with another
