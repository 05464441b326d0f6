"""Sampling: the KV-cached loop against full recomputation, padding, seeds, filters against
Hugging Face's logits processors, stop conditions and UTF-8-safe streaming."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtl import DtlError, ModelConfig, TransformerLM
from dtl.generate import (
    SamplingOptions,
    apply_repetition_penalty,
    filter_top_p,
    generate,
    generate_tokens,
    sample_next,
    stream,
    stream_batch,
)


def tiny_model(vocab_size: int = 97, max_seq_length: int = 64, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                         max_seq_length=max_seq_length)  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():  # larger logits than the 0.02 init, so greedy paths are not ties
        model.head.weight.mul_(20)
    return model


def naive_greedy(model: TransformerLM, ids: list[int], n: int) -> list[int]:
    """The oracle: recompute the full sequence each step and take the argmax."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids) :]


class ScriptedLM(nn.Module):
    """A stand-in model that emits a fixed token script (its n-th new token is script[n]),
    so text-level behaviour can be checked on exactly known tokens."""

    def __init__(self, script: list[int], vocab_size: int, max_seq_length: int = 256) -> None:
        super().__init__()
        self.script = script
        self.config = ModelConfig(vocab_size=vocab_size, d_model=8, n_heads=1, n_layers=1,
                                  d_ff=8, max_seq_length=max_seq_length)  # fmt: skip
        self.dummy = nn.Parameter(torch.zeros(1))
        self.prompt_len = 0

    def allocate_cache(self, batch_size, max_len=None):
        return {"length": 0}

    def forward(self, input_ids, attention_mask=None, cache=None, last_only=False, layout=None):
        if cache is not None:
            if cache["length"] == 0:
                self.prompt_len = input_ids.size(1)
            cache["length"] += input_ids.size(1)
            seen = cache["length"]
        else:
            if self.prompt_len == 0 or input_ids.size(1) <= self.prompt_len:
                self.prompt_len = input_ids.size(1)
            seen = input_ids.size(1)
        step = seen - self.prompt_len
        logits = torch.zeros(input_ids.size(0), 1, self.config.vocab_size)
        logits[:, 0, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits


# ---------------------------------------------------------------------- the token loop
def test_greedy_with_cache_equals_full_recomputation():
    model = tiny_model()
    prompt = [5, 17, 3, 88, 41]
    expected = naive_greedy(model, prompt, 30)
    for use_cache in (True, False):
        out = generate_tokens(model, torch.tensor([prompt]), 30, temperature=0,
                              use_cache=use_cache)  # fmt: skip
        assert out[0, :5].tolist() == prompt
        assert out[0, 5:].tolist() == expected
    assert len(set(expected)) > 3  # a real path, not one token repeated


def test_batched_prompts_of_different_lengths_equal_unbatched_runs():
    model = tiny_model()
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [50, 60, 70]]
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = torch.tensor(p), 1
    for use_cache in (True, False):
        out = generate_tokens(model, ids, 20, temperature=0, attention_mask=mask,
                              use_cache=use_cache)  # fmt: skip
        for i, p in enumerate(prompts):
            assert out[i, T:].tolist() == naive_greedy(model, p, 20), (i, use_cache)


def test_same_seed_same_sample_and_other_seeds_differ():
    model = tiny_model()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    kw = dict(max_new_tokens=25, temperature=1.5, top_k=40)
    a = generate_tokens(model, ids, seed=123, **kw)
    b = generate_tokens(model, ids, seed=123, **kw)
    c = generate_tokens(model, ids, seed=124, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the cache changes nothing about which sample a seed draws
    assert torch.equal(a, generate_tokens(model, ids, seed=123, use_cache=False, **kw))


def test_top_k_one_is_greedy():
    model = tiny_model()
    ids = torch.tensor([[9, 8, 7]])
    sampled = generate_tokens(model, ids, 15, temperature=1.0, top_k=1, seed=0)
    assert sampled[0, 3:].tolist() == naive_greedy(model, [9, 8, 7], 15)


def test_stops_at_end_of_text_and_pads_finished_rows():
    model = tiny_model()
    prompt = [5, 17, 3]
    path = naive_greedy(model, prompt, 20)
    eos = path[3]
    first = path.index(eos)
    out = generate_tokens(model, torch.tensor([prompt]), 20, temperature=0, eos_id=eos)
    assert out[0, 3:].tolist() == path[: first + 1]  # ends with the end-of-text token
    # in a batch, a finished row is padded with eos while the other row goes on
    other = [60, 61, 62]
    batch = generate_tokens(model, torch.tensor([prompt, other]), 20, temperature=0, eos_id=eos)
    other_path = naive_greedy(model, other, 20)
    if eos not in other_path:
        assert batch.size(1) == 23
        assert batch[0, 3 + first + 1 :].eq(eos).all()
        assert batch[1, 3:].tolist() == other_path


def test_never_runs_past_max_seq_length():
    """The one rule on token ids (context 32), against greedy by full recomputation."""
    model = tiny_model(max_seq_length=32)
    prompt = list(range(1, 41))  # 40 tokens, longer than the context
    out = generate_tokens(model, torch.tensor([prompt]), 10, temperature=0)
    assert out.size(1) == 32  # the prompt fills it: its last 31 tokens + 1 new
    assert out[0, :31].tolist() == prompt[-31:]
    assert out[0, 31:].tolist() == naive_greedy(model, prompt[-31:], 1)
    # a prompt that leaves room keeps every token: max_new_tokens is cut to the room, 32 - 22
    out = generate_tokens(model, torch.tensor([prompt[:22]]), 20, temperature=0)
    assert out[0].tolist() == prompt[:22] + naive_greedy(model, prompt[:22], 10)
    with pytest.raises(DtlError, match="the prompt is 40 tokens but the model's context is 32"):
        generate_tokens(model, torch.tensor([prompt]), 10, truncate=False)
    out = generate_tokens(model, torch.tensor([prompt[:22]]), 20, temperature=0, truncate=False)
    assert out.size(1) == 32  # truncate=False drops no prompt token, but still cuts
    assert generate_tokens(model, torch.tensor([[1]]), 32).size(1) == 32  # 31 new, not an error


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    model = tiny_model()
    args = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(DtlError, match=message):
        generate_tokens(model, torch.tensor([[1, 2]]), **args)


# ---------------------------------------------------------------------- filters vs HF
def test_top_k_top_p_and_repetition_penalty_match_hugging_face():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 500, generator=g) * 3
    context = torch.randint(0, 500, (4, 12), generator=g)
    for k in (1, 7, 50):  # every token sample_next draws is in HF's top-k set
        allowed = torch.isfinite(TopKLogitsWarper(top_k=k)(context, logits.clone()))
        options = SamplingOptions(temperature=1.0, top_k=k)
        drawn = torch.stack([sample_next(logits, options, None, g) for _ in range(200)], 1)
        assert bool(allowed.gather(1, drawn).all()), k
        if k == 1:
            assert torch.equal(drawn, logits.argmax(-1, keepdim=True).expand_as(drawn))
    for p in (0.1, 0.5, 0.9):
        ours = filter_top_p(logits, p)
        theirs = TopPLogitsWarper(top_p=p)(context, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), p
        assert torch.isfinite(ours).sum(-1).min() >= 1
    seen = torch.zeros(4, 500, dtype=torch.bool).scatter(1, context, True)
    ours = apply_repetition_penalty(logits, seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(penalty=1.3)(context, logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_top_p_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_top_p(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.85)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.3)).tolist() == [[True, False, False, False]]


def test_samples_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SamplingOptions(temperature=0.5), None, g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]) / 0.5, dim=0)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_repetition_penalty_changes_greedy_output_away_from_repeats():
    model = tiny_model()
    prompt = [5, 17, 3]
    plain = generate_tokens(model, torch.tensor([prompt]), 30, temperature=0)[0, 3:].tolist()
    penalised = generate_tokens(model, torch.tensor([prompt]), 30, temperature=0,
                                repetition_penalty=1e6)[0, 3:].tolist()  # fmt: skip
    # with an enormous penalty a seen token is only chosen once every unseen one is worse,
    # which for random logits means greedy never repeats a token of its context
    assert len(set(penalised)) == len(penalised)
    assert not set(penalised) & set(prompt)
    assert len(set(plain)) < len(plain)


def test_streaming_never_breaks_a_multibyte_character(gpt2):
    text = " naïve café — 日本語 ☃ 🙂 done"
    ids = gpt2.encode(text)
    # the oracle: some of these tokens are not valid UTF-8 on their own
    assert any("\ufffd" in gpt2.decode([i]) for i in ids)
    model = ScriptedLM(ids + [gpt2.eos_id], gpt2.vocab_size)
    pieces = list(stream(model, gpt2, "Hello", max_new_tokens=len(ids) + 5, temperature=0))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # streamed in pieces, not at the end


def test_stop_string_cuts_the_text_and_is_never_streamed(gpt2):
    text = " Paris is the capital.\nQuestion: What next?"
    ids = gpt2.encode(text)
    model = ScriptedLM(ids, gpt2.vocab_size)
    chunks = list(stream_batch(model, gpt2, ["Question: Where?\nAnswer:"], 40, temperature=0,
                               stop=["\nQuestion:"]))  # fmt: skip
    assert "".join(c.text for c in chunks) == " Paris is the capital."
    assert chunks[-1].finish_reason == "stop"
    # a stop string that never appears leaves the text whole, ending for "length"
    done = generate(ScriptedLM(ids, gpt2.vocab_size), gpt2, "Q", len(ids), temperature=0,
                    stop=["zebra"])[0]  # fmt: skip
    assert done.text == text and done.finish_reason == "length"
    assert done.token_ids == ids


def test_end_of_text_ends_a_completion(gpt2):
    ids = gpt2.encode(" short answer")
    model = ScriptedLM(ids + [gpt2.eos_id, 11, 12], gpt2.vocab_size)
    done = generate(model, gpt2, ["Q"], 20, temperature=0)[0]
    assert done.text == " short answer"
    assert done.finish_reason == "stop"
    assert done.token_ids == ids
    assert done.prompt_tokens == 1


def test_text_generate_batched_equals_one_by_one(gpt2):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=gpt2.vocab_size, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=64)  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)
    prompts = ["The", "Once upon a time in a land far away", "Q: 2+2?"]
    batched = generate(model, gpt2, prompts, 12, temperature=0)
    for prompt, got in zip(prompts, batched, strict=True):
        alone = generate(model, gpt2, prompt, 12, temperature=0)[0]
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text == gpt2.decode(alone.token_ids)
        assert got.prompt_tokens == len(gpt2.encode(prompt))


def test_top_k_top_p_sampling_draws_from_the_filtered_distribution():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 30, generator=g) * 2
    opts = SamplingOptions(temperature=0.7, top_k=6, top_p=0.8)
    draws = sample_next(logits.repeat(30000, 1), opts, None, g)
    freq = torch.bincount(draws, minlength=30).float() / len(draws)
    scaled = logits / 0.7  # the oracle: Hugging Face's warpers over the whole vocabulary
    filtered = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(6)(None, scaled.clone()))
    expected = torch.softmax(filtered, dim=-1)[0]
    assert (expected > 0).sum() < 6  # top-p really cut some of the k
    torch.testing.assert_close(freq, expected, atol=0.012, rtol=0)


def test_decode_head_equals_the_models_own_head():
    from dtl.generate import last_logits
    from dtl.generate.decode import plan_for

    model = tiny_model()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        torch.testing.assert_close(last_logits(model, ids, None, None, plan_for(model)),
                                   model(ids, last_only=True)[:, -1])  # fmt: skip
        model.head.weight.add_(1.0)  # a changed weight is picked up, not a stale copy
        torch.testing.assert_close(last_logits(model, ids, None, None, plan_for(model)),
                                   model(ids, last_only=True)[:, -1])  # fmt: skip


def test_rows_with_their_own_settings_equal_their_solo_runs(gpt2):
    from dtl.generate import Request, stream_requests

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=gpt2.vocab_size, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=64)  # fmt: skip
    model = TransformerLM(config).eval()
    requests = [
        Request(["The Normans"], SamplingOptions(temperature=1.0, top_k=20, seed=3,
                                                 max_new_tokens=5)),
        Request(["A much longer prompt about Rollo"], SamplingOptions(temperature=0,
                                                                      max_new_tokens=12)),
        Request(["Hi"], SamplingOptions(temperature=0.8, top_p=0.9, seed=11, max_new_tokens=9)),
    ]
    texts, finish, ids = ["", "", ""], [None, None, None], [[], [], []]
    for chunk in stream_requests(model, gpt2, requests):
        texts[chunk.index] += chunk.text
        if chunk.finish_reason:
            finish[chunk.index], ids[chunk.index] = chunk.finish_reason, chunk.token_ids
    for r, text, row_ids in zip(requests, texts, ids, strict=True):
        o = r.options
        alone = generate(model, gpt2, r.prompts[0], o.max_new_tokens, o.temperature, o.top_k,
                         o.top_p, seed=o.seed)[0]
        assert text == alone.text and row_ids == alone.token_ids
        assert len(row_ids) == o.max_new_tokens  # each row stops at its own limit
    assert finish == ["length", "length", "length"]


# ---------------------------------------------------------------------- the commands
@pytest.fixture
def model_dir(tmp_path, gpt2):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=gpt2.vocab_size, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=64)  # fmt: skip
    model = TransformerLM(config)
    with torch.no_grad():
        model.head.weight.mul_(30)
    model.save_pretrained(tmp_path / "model")
    gpt2.save(tmp_path / "model")
    return tmp_path / "model"


def test_dtl_generate_and_ask_print_the_library_result(dtl, model_dir, gpt2):
    from dtl.data.qa import qa_prompt, qa_stops
    from dtl.generate.sampling import ASK_DEFAULTS
    from dtl.model.store import load_model

    model, _ = load_model(model_dir)
    want = generate(model, gpt2, "The Normans", 10, temperature=0)[0].text
    for extra in ([], ["--no-kv-cache"]):
        code, out, err = dtl("generate", "--model", model_dir, "--prompt", "The Normans",
                             "--max-new-tokens", 10, "--temperature", 0, *extra)  # fmt: skip
        assert code == 0, err
        assert out == want + "\n"
    # ask's defaults: greedy, the repetition penalty, the Q&A stops
    penalty = ASK_DEFAULTS.repetition_penalty
    answer = generate(model, gpt2, qa_prompt("Who was Rollo?"), 12, temperature=0,
                      repetition_penalty=penalty, stop=qa_stops())[0].text  # fmt: skip
    code, out, err = dtl("ask", "--model", model_dir, "Who was Rollo?", "--max-new-tokens", 12)
    assert code == 0, err
    assert out == answer.lstrip() + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be in"),
        (["--top-k", "-2"], "--top-k -2"),
        (["--top-p", "2"], "top_p must be in"),
    ],
)
def test_dtl_generate_bad_options(dtl, model_dir, args, message):
    code, out, err = dtl("generate", "--model", model_dir, "--prompt", "Hi", *args)
    assert code == 2 and message in err and out == ""


def test_dtl_generate_unknown_model(dtl, tmp_path):
    code, _, err = dtl("generate", "--model", tmp_path / "nope", "--prompt", "Hi")
    assert code == 2 and "no such model" in err


def test_dtl_chat_commands_and_answers(dtl, model_dir, monkeypatch):
    lines = iter(["/help", "/temp 0.5", "/temp hot", "/settings", "Who was Rollo?", "/reset",
                  "/nonsense", "/quit"])  # fmt: skip
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = dtl("chat", "--model", model_dir, "--max-new-tokens", 6, "--seed", 1)
    assert code == 0, err
    assert "/reset" in out and "temperature = 0.5" in out
    assert "/temp 'hot'" in out  # a bad value is reported, the loop goes on
    assert "temperature=0.5" in out and "(conversation cleared)" in out
    assert "unknown command /nonsense" in out
    assert "dtl> " in out


@pytest.mark.parametrize("verb", ["generate", "ask", "chat", "eval", "serve"])
@pytest.mark.parametrize(
    "device, unavailable, message",
    [
        ("foo", None, "unknown device 'foo'"),
        ("mps", "mps", "MPS is not available here"),
        ("cuda", "cuda", "PyTorch sees no CUDA GPU"),
        ("cuda:1", "cuda", "PyTorch sees no CUDA GPU"),
    ],
)
def test_bad_device_is_one_clear_error(dtl, model_dir, tmp_path, monkeypatch, verb, device,
                                       unavailable, message):  # fmt: skip
    if unavailable == "mps":
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if unavailable == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "text.txt").write_text("Some text to score.\n")
    extra = {"generate": ["--prompt", "Hi"], "ask": ["Who?"], "chat": [],
             "eval": ["--data", tmp_path / "text.txt"], "serve": ["--port", "8765"]}[verb]  # fmt: skip
    code, out, err = dtl(verb, "--model", model_dir, "--device", device, *extra)
    assert code == 2 and out == ""
    assert err.startswith(f"dtl {verb}: error: ") and message in err
    assert "Traceback" not in err and "safetensors" not in err


@pytest.mark.parametrize("top_k", [None, 5])
def test_a_tiny_temperature_is_nearly_greedy_not_an_overflow(top_k):
    """logits / 1e-30 overflows float32 to inf; the sampler must still draw (the argmax)."""
    from dtl.generate import SamplingOptions, sample_next

    logits = torch.randn(4, 97) * 3
    opts = SamplingOptions(temperature=1e-30, top_k=top_k, top_p=0.9, seed=0)
    got = sample_next(logits, opts, None, torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1))


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("top_p", [1e-46, 1e-300, 1e-9])
def test_a_tiny_top_p_keeps_the_top_token(top_k, top_p):
    """1e-46 is 0 in float32: a top-p below it once dropped every token (a NaN draw). Any top_p
    > 0 keeps at least the most likely token, as HF's TopPLogitsWarper does."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from dtl.generate import SamplingOptions, sample_next

    logits = torch.randn(4, 97) * 3
    kept = torch.isfinite(filter_top_p(logits, top_p))
    theirs = torch.isfinite(TopPLogitsWarper(top_p=top_p)(torch.zeros(4, 1).long(), logits.clone()))
    assert torch.equal(kept, theirs) and kept.sum(-1).tolist() == [1, 1, 1, 1]
    opts = SamplingOptions(temperature=1.0, top_k=top_k, top_p=top_p, seed=0)
    got = sample_next(logits, opts, None, torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1))


def test_dtl_generate_with_a_tiny_top_p_is_greedy(dtl, model_dir):
    greedy = dtl("generate", "--model", model_dir, "--prompt", "Hi", "--max-new-tokens", 5,
                 "--temperature", 0)  # fmt: skip
    tiny = dtl("generate", "--model", model_dir, "--prompt", "Hi", "--max-new-tokens", 5,
               "--top-p", "1e-300", "--seed", 3)  # fmt: skip
    assert tiny[0] == 0 and tiny[1] == greedy[1] and greedy[0] == 0, tiny[2]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngrams_match_hugging_face(n):
    """The oracle: transformers' NoRepeatNGramLogitsProcessor on the same logits and rows."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    from dtl.generate import ban_repeated_ngrams

    torch.manual_seed(n)
    rows = torch.tensor(
        [[5, 6, 7, 5, 6, 7, 5, 6], [1, 2, 3, 4, 1, 2, 1, 2], [9, 9, 9, 9, 9, 9, 9, 9]]
    )
    logits = torch.randn(3, 12)
    ours = ban_repeated_ngrams(logits, rows.tolist(), n)
    theirs = NoRepeatNGramLogitsProcessor(n)(rows, logits.clone())
    assert torch.equal(ours, theirs)
    assert torch.isinf(ours).any()  # each case bans something


def test_no_repeat_ngram_hand_computed():
    # "a b c a b": n=3, the head "a b" was followed by "c" -> "c" is banned; n=2, the head "b"
    # was followed by "c" -> "c" again; n=4, the head "c a b" never occurred before.
    a, b, c = 0, 1, 2
    logits = torch.zeros(1, 4)
    assert _banned(logits, [a, b, c, a, b], 3) == [c]
    assert _banned(logits, [a, b, c, a, b], 2) == [c]
    assert _banned(logits, [a, b, c, b, a], 2) == [b]  # after "a": "a b" was seen
    assert _banned(logits, [a, b, c, a, b], 4) == []  # "c a b" never followed by anything yet


def _banned(logits, seq, n):
    from dtl.generate import ban_repeated_ngrams

    out = ban_repeated_ngrams(logits, [seq], n)
    return torch.isinf(out[0]).nonzero().flatten().tolist()


def test_no_repeat_ngram_greedy_never_repeats_a_trigram():
    """Greedy through the whole loop (cache, prompt included) with n=3: no trigram twice."""
    model = tiny_model(vocab_size=13)
    prompt = torch.tensor([[3, 4, 5, 3, 4]])
    free = generate_tokens(model, prompt, 40, temperature=0)[0].tolist()
    banned = generate_tokens(model, prompt, 40, options=SamplingOptions(
        temperature=0, max_new_tokens=40, no_repeat_ngram_size=3))[0].tolist()  # fmt: skip
    grams = [tuple(banned[i : i + 3]) for i in range(len(banned) - 2)]
    assert len(grams) == len(set(grams))
    assert len({tuple(free[i : i + 3]) for i in range(len(free) - 2)}) < len(free) - 2  # it loops
