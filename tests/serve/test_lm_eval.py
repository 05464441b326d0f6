"""lm-evaluation-harness scores a DTL model through `dtl serve`: its `local-completions` model
(default tokenizer backend: it finds the server's /tokenizer_info and /tokenize) runs three
local tasks offline (tests/serve/lm_eval_tasks/: multiple choice, a perplexity task, and a
generate_until task with no max_gen_toks, so it sends max_tokens 256 to a 64-token model), and
every figure it reports equals one computed here from the model's own forward with torch.

Needs the `eval` extra (`pip install -e ".[eval]"`); CI installs it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from dtl import ModelConfig, TransformerLM
from dtl.generate import generate

if importlib.util.find_spec("lm_eval") is None:  # CI installs the extra: never skip there
    MISSING = 'lm-evaluation-harness is not installed (the `eval` extra: pip install -e ".[eval]")'
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(MISSING, pytrace=False)
    pytest.skip(MISSING, allow_module_level=True)

TASKS = Path(__file__).parent / "lm_eval_tasks"
CONTEXT = 64


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny GPT-2-vocabulary model saved as a model dir, served by `dtl serve` (a separate
    process, as users run it) on a free loopback port: (url, model, tokenizer)."""
    from testkit import shared_path

    from dtl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2", gpt2_dir=shared_path("gpt2"))
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=CONTEXT)  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():  # peaky logits: choices get clearly different scores
        model.head.weight.mul_(30)
    model_dir = tmp_path_factory.mktemp("model")
    model.save_pretrained(model_dir)
    tokenizer.save(model_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "dtl", "serve", "--model", str(model_dir), "--port", str(port),
         "--name", "tiny", "--threads", "1", "--dtype", "fp32"],  # the model's own scores
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, f"dtl serve exited: {server.stdout.read()}"
            assert time.time() < deadline, "dtl serve did not answer /health in 60 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url, model, tokenizer
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def harness(served, tmp_path_factory):
    """lm_eval's CLI, as the docs give it, over the three local tasks, offline: (results,
    {task: samples in doc order})."""
    url = served[0]
    out = tmp_path_factory.mktemp("lm_eval")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(out / "hf"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [
        sys.executable, "-m", "lm_eval", "--model", "local-completions",
        "--model_args", f"model=tiny,base_url={url}/v1/completions,num_concurrent=1,max_retries=1",
        "--tasks", "dtl_mc,dtl_rolling,dtl_gen", "--include_path", str(TASKS),
        "--output_path", str(out / "results"), "--log_samples", "--seed", "0",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=TASKS, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "Using remote tokenizer" in run.stderr or "remote tokenizer" in run.stderr.lower()
    [results_file] = (out / "results").rglob("results_*.json")
    samples = {}
    for task in ("dtl_mc", "dtl_rolling", "dtl_gen"):
        [path] = (out / "results").rglob(f"samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return json.loads(results_file.read_text())["results"], samples


@torch.no_grad()
def continuation_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) by hand: the sum of log_softmax at each continuation
    token, and whether every one of them is the model's argmax there."""
    ids = context + continuation
    logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)
    total, greedy = 0.0, True
    for i in range(len(context), len(ids)):
        total += float(logprobs[i - 1, ids[i]])
        greedy = greedy and int(logprobs[i - 1].argmax()) == ids[i]
    return total, greedy


def test_multiple_choice_scores_equal_the_models_own(served, harness):
    _, model, tokenizer = served
    results, samples = harness
    docs = _rows("dtl_mc")
    correct, correct_norm = [], []
    for doc, sample in zip(docs, samples["dtl_mc"], strict=True):
        context = f"Question: {doc['question']}\nAnswer:"
        # the harness's split: context alone, then the rest of (context + " " + choice)
        ctx = tokenizer.encode(context)
        want = []
        for choice in doc["choices"]:
            whole = tokenizer.encode(context + " " + choice)
            assert whole[: len(ctx)] == ctx
            want.append(continuation_logprob(model, ctx, whole[len(ctx):]))
        # the samples file holds each (loglikelihood, is_greedy) pair as strings
        got = [(float(ll), str(greedy) == "True") for ll, greedy in sample["filtered_resps"]]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-3)
        assert [g[1] for g in got] == [w[1] for w in want]
        scores = [w[0] for w in want]
        correct.append(scores.index(max(scores)) == doc["answer"])
        norm = [s / len(" " + c) for s, c in zip(scores, doc["choices"], strict=True)]
        correct_norm.append(norm.index(max(norm)) == doc["answer"])
    figures = results["dtl_mc"]
    assert figures["acc,none"] == pytest.approx(sum(correct) / len(docs))
    assert figures["acc_norm,none"] == pytest.approx(sum(correct_norm) / len(docs))


def test_perplexity_equals_the_models_own(served, harness):
    _, model, tokenizer = served
    results, samples = harness
    total, words, nbytes = 0.0, 0, 0
    for doc, sample in zip(_rows("dtl_rolling"), samples["dtl_rolling"], strict=True):
        ids = tokenizer.encode(doc["text"])
        assert len(ids) < CONTEXT  # one window: every token scored after end-of-text + the rest
        ll, _ = continuation_logprob(model, [tokenizer.eos_id], ids)
        assert float(sample["filtered_resps"][0]) == pytest.approx(ll, abs=1e-3)
        total += ll
        words += len(re.split(r"\s+", doc["text"]))
        nbytes += len(doc["text"].encode())
    figures = results["dtl_rolling"]
    assert figures["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert figures["byte_perplexity,none"] == pytest.approx(math.exp(-total / nbytes), rel=1e-4)
    assert figures["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2),
                                                          rel=1e-4)  # fmt: skip


def test_generate_until_runs_with_max_tokens_beyond_the_context(served, harness):
    """No max_gen_toks: the harness asks for 256 tokens of a 64-token model; the server cuts
    that to the room the prompt leaves, and the text is the model's greedy continuation."""
    _, model, tokenizer = served
    _, samples = harness
    for doc, sample in zip(_rows("dtl_gen"), samples["dtl_gen"], strict=True):
        prompt = f"Question: {doc['question']}\nAnswer:"
        room = CONTEXT - len(tokenizer.encode(prompt))
        want = generate(model, tokenizer, prompt, room, temperature=0,
                        stop=["\n\n", "<|endoftext|>"])[0].text  # fmt: skip
        assert sample["resps"][0][0] == want
