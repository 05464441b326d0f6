"""Fingerprint what DTL computes, to show a restructuring changed nothing, bit for bit.

Run it on the commit before a change and on the commit after, then compare the two files:

    python tools/behaviour_check.py --out /tmp/before.json     # on the old commit
    python tools/behaviour_check.py --out /tmp/after.json      # on the new one
    python tools/behaviour_check.py --compare /tmp/before.json /tmp/after.json

It records, with fixed seeds and one thread:
- prepared shards: the sha256 of every file `dtl prepare` writes (pack, pad + answer-only loss,
  one text file split within it), from the embedded corpus and a GPT-2-free BPE;
- a seeded run: every loss, lr and val_loss `dtl train` logs, and the sha256 of the final
  weights, for a short run, and the same run interrupted and resumed;
- seeded generation: token ids and text of `generate_tokens` (greedy, top-k, top-p,
  repetition penalty, left-padded batches, without the KV cache), `generate` / `stream_batch`,
  `dtl generate` / `dtl ask` as printed, and the HTTP API's completions and chat, n > 1.

Only public entry points that exist before and after are used (`dtl.cli.main`,
`dtl.generate`, `dtl.serve.api.create_app`, `dtl.tokenizer`), so the script runs on both.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cli(*args) -> tuple[int, str]:
    from dtl.cli import main

    # the fingerprint is of fp32 inference: where the verbs take --dtype (default auto, which
    # is bf16 on a CPU with native bf16), ask for fp32, so old and new code run the same maths
    model_verbs = ("generate", "ask", "chat", "eval", "serve")
    if args[0] in model_verbs and "--dtype" in _verb_help(args[0]):
        args = (*args, "--dtype", "fp32")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def _verb_help(verb: str) -> str:
    from dtl.cli import build_parser

    for action in build_parser()._subparsers._group_actions:
        if verb in action.choices:
            return action.choices[verb].format_help()
    return ""


def corpus_text(work: Path) -> Path:
    """A text file of the embedded Wikipedia excerpt's cleaned articles."""
    from dtl.corpus import corpus_files

    wiki = next(p for p in corpus_files() if "wikipedia" in p.name)
    code, _ = cli("extract", wiki, "-o", work / "wiki.jsonl")
    assert code == 0
    lines = [json.loads(x)["text"] for x in (work / "wiki.jsonl").read_text().splitlines()]
    path = work / "wiki.txt"
    path.write_text("\n\n".join(lines[:40]), encoding="utf-8")
    return path


def data_fingerprints(work: Path, text: Path) -> dict:
    from dtl.corpus import corpus_files

    squad = next(p for p in corpus_files() if "squad" in p.name)
    out = {}
    code, _ = cli("tokenizer", "train", text, "--vocab-size", 1024, "-o", work / "tok")
    assert code == 0
    out["tokenizer"] = {p.name: sha256(p) for p in sorted((work / "tok").iterdir())}
    cases = {
        "pack": [text, "--max-length", 64],
        "pad_answer_only": [squad, "--max-length", 96, "--answer-only-loss"],
        "articles_both": [work / "wiki.jsonl", "--articles-as", "both", "--max-length", 64],
    }
    for name, args in cases.items():
        d = work / f"data-{name}"
        code, _ = cli("prepare", *args, "-o", d, "--tokenizer", work / "tok", "--seed", 3)
        assert code == 0, name
        files = {}
        for p in sorted(d.iterdir()):
            if p.name == "meta.json":  # paths and timings differ between runs: the rest
                meta = json.loads(p.read_text())
                for s in meta.get("sources", []):
                    s.pop("path", None)
                for key in ("tokenizer", "seconds"):  # a path and a timing
                    meta.pop(key, None)
                files[p.name] = meta
            elif p.is_file():
                files[p.name] = sha256(p)
        out[name] = files
    one = work / "one.txt"
    one.write_text(text.read_text()[:60000].replace("\n\n", " "), encoding="utf-8")
    code, _ = cli("prepare", one, "-o", work / "data-one", "--tokenizer", work / "tok",
                  "--max-length", 64)  # fmt: skip
    assert code == 0
    out["one_file"] = {p.name: sha256(p) for p in sorted((work / "data-one").iterdir())
                       if p.suffix in (".bin", ".mask", ".idx")}  # fmt: skip
    return out


def run_fingerprint(run: Path) -> dict:
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keep = ("step", "loss", "lr", "grad_norm", "val_loss")
    ckpt = run / "checkpoints" / "latest"
    return {
        "metrics": [{k: m[k] for k in keep if k in m} for m in metrics],
        "weights": sha256(ckpt / "model.safetensors"),
        "config": json.loads((ckpt / "config.json").read_text()),
    }


def train_fingerprints(work: Path) -> dict:
    common = ["--preset", "tiny", "--d-model", 32, "--n-heads", 2, "--n-layers", 2,
              "--d-ff", 64, "--batch-size", 4, "--log-every", 2, "--eval-every", 5,
              "--eval-batches", 2, "--seed", 1, "--no-progress",
              "--precision", "fp32"]  # fmt: skip
    # fp32 named: `auto` is bf16 on a CPU with native bf16 since issue 21, which would make the
    # fingerprint depend on the machine rather than on the code.
    out = {}
    code, _ = cli("train", "--data", work / "data-pack", "--out", work / "run-a",
                  "--max-steps", 12, *common)  # fmt: skip
    assert code == 0
    out["pack"] = run_fingerprint(work / "run-a")
    code, _ = cli("train", "--data", work / "data-pad_answer_only", "--out", work / "run-b",
                  "--max-steps", 8, "--grad-accum", 2, "--lr", "3e-3", *common)  # fmt: skip
    assert code == 0
    out["pad_accum"] = run_fingerprint(work / "run-b")
    # interrupted at step 6 (max-steps 6), then resumed to 12: must equal run-a
    code, _ = cli("train", "--data", work / "data-pack", "--out", work / "run-c",
                  "--max-steps", 6, *common)  # fmt: skip
    assert code == 0
    code, _ = cli("train", "--resume", work / "run-c", "--max-steps", 12, "--no-progress")
    assert code == 0
    out["resumed"] = run_fingerprint(work / "run-c")
    code, _ = cli("train", "--data", work / "one.txt", "--tokenizer", work / "tok",
                  "--out", work / "run-d", "--max-steps", 4, "--seq-len", 32,
                  *common)  # fmt: skip
    assert code == 0
    out["raw_file"] = run_fingerprint(work / "run-d")
    return out


def generation_fingerprints(work: Path) -> dict:
    import torch

    from dtl import ModelConfig, TransformerLM
    from dtl.generate import generate, generate_tokens, stream_batch
    from dtl.tokenizer import load_tokenizer

    tok = load_tokenizer(str(work / "tok"))
    torch.manual_seed(5)
    model = TransformerLM(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, d_model=64,
                                             n_heads=4, n_layers=2, d_ff=128,
                                             max_seq_length=96)).eval()  # fmt: skip
    ids = torch.tensor([tok.encode("The history of the region")])
    out: dict = {}
    settings = {
        "greedy": {"temperature": 0.0},
        "topk": {"temperature": 0.9, "top_k": 20, "seed": 1},
        "topp": {"temperature": 1.1, "top_p": 0.8, "seed": 2},
        "all": {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.3,
                "seed": 3},
        "penalty_greedy": {"temperature": 0.0, "repetition_penalty": 1.5},
        "full_vocab": {"temperature": 1.0, "seed": 4},
    }
    for name, kw in settings.items():
        out[f"tokens_{name}"] = generate_tokens(model, ids, 30, **kw).tolist()
        out[f"tokens_{name}_nocache"] = generate_tokens(model, ids, 30, use_cache=False,
                                                        **kw).tolist()  # fmt: skip
    a, b = tok.encode("Once upon a time in"), tok.encode("Rivers")
    batch = torch.tensor([a, [0] * (len(a) - len(b)) + b])
    mask = torch.tensor([[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)])
    for name, kw in settings.items():
        out[f"batch_{name}"] = generate_tokens(model, batch, 25, attention_mask=mask,
                                               **kw).tolist()  # fmt: skip
    out["truncated"] = generate_tokens(model, torch.arange(90)[None] % tok.vocab_size, 20,
                                       temperature=0).tolist()  # fmt: skip
    prompts = ["Question: Who were the Normans?\nAnswer:", "The city", ""]
    for name, kw in settings.items():
        done = generate(model, tok, prompts, 24, stop=["\n", " city"], **kw)
        out[f"text_{name}"] = [[c.text, c.token_ids, c.prompt_tokens, c.finish_reason]
                               for c in done]  # fmt: skip
        out[f"stream_{name}"] = [[c.index, c.text, c.finish_reason, c.token_ids] for c in
                                 stream_batch(model, tok, prompts, 20, **kw)]  # fmt: skip
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tok.save(model_dir)
    for name, args in {
        "cli_generate": ["generate", "--model", model_dir, "--prompt", "The river", "--seed", 0,
                         "--max-new-tokens", 30],
        "cli_generate_greedy_nocache": ["generate", "--model", model_dir, "--prompt", "A",
                                        "--temperature", 0, "--no-kv-cache", "--echo"],
        "cli_ask": ["ask", "--model", model_dir, "What is a river?", "--max-new-tokens", 40],
        "cli_ask_sampled": ["ask", "--model", model_dir, "Who?", "--temperature", 0.8,
                            "--top-p", 0.9, "--repetition-penalty", 1.2, "--seed", 7],
    }.items():
        out[name] = cli(*args)
    out["api"] = api_fingerprints(model, tok)
    out["engine"] = engine_fingerprints(model, tok)
    return out


def api_fingerprints(model, tok) -> list:
    from fastapi.testclient import TestClient

    from dtl.serve.api import create_app

    bodies = [
        ("/v1/completions", {"prompt": "The river", "max_tokens": 20, "seed": 1}),
        ("/v1/completions", {"prompt": ["A", "The old"], "max_tokens": 12, "n": 2, "seed": 4,
                             "temperature": 0.7, "top_p": 0.9, "stop": [" the"]}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10, "temperature": 0,
                             "repetition_penalty": 1.4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Who?"}],
                                  "max_tokens": 16, "seed": 2, "top_k": 10}),
        ("/v1/completions", {"prompt": "Stream", "max_tokens": 8, "seed": 5, "stream": True,
                             "stream_options": {"include_usage": True}}),
    ]
    out = []
    with TestClient(create_app(model, tok, "m")) as client:
        for path, body in bodies:
            r = client.post(path, json=body)
            if body.get("stream"):
                events = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: {")]  # fmt: skip
                out.append([e.get("choices") for e in events] + [events[-1].get("usage")])
            else:
                j = r.json()
                out.append([r.status_code, j["choices"], j["usage"]])
    return out


def engine_fingerprints(model, tok) -> list:
    """Requests joining a running batch at different steps (the server's continuous batching)."""
    from dtl.generate import SamplingOptions

    try:  # before the restructuring: dtl.serve.engine, requests named by a key
        from dtl.serve.engine import ContinuousBatch

        def add(batch, key, prompts, n, stop=(), **kw):
            batch.add(key, prompts, n, SamplingOptions(**kw), list(stop))

        def name(key):
            return key
    except ImportError:  # after: dtl.generate.batch, one Request record each
        from dtl.generate import ContinuousBatch, Request

        names = {}

        def add(batch, key, prompts, n, stop=(), **kw):
            request = Request(prompts, SamplingOptions(**kw, max_new_tokens=n, stop=stop))
            names[id(request)] = key
            batch.add([request])

        def name(request):
            return names[id(request)]

    batch = ContinuousBatch(model, tok, max_rows=8)
    log = []
    add(batch, "a", ["The river", "A"], 12, ["\n"], temperature=0.8, seed=1)
    for step in range(30):
        if step == 3:
            add(batch, "b", ["Question: Who?\nAnswer:"], 10, temperature=0.0,
                repetition_penalty=1.3)
        if step == 5:
            add(batch, "c", ["x y z"], 6, temperature=1.0, top_k=5, seed=9)
        if not batch:
            break
        for key, item in batch.step():
            log.append([step, name(key), getattr(item, "index", None),
                        getattr(item, "text", repr(item)), getattr(item, "finish_reason", None)])
    return log


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        bad = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        for section in bad:
            b, a = before.get(section) or {}, after.get(section) or {}
            keys = sorted(set(b) | set(a)) if isinstance(b, dict) else [section]
            for k in keys:
                if (b.get(k) if isinstance(b, dict) else b) != (a.get(k) if isinstance(a, dict) else a):
                    print(f"DIFFERENT: {section}.{k}")
        print("identical" if not bad else f"{len(bad)} section(s) differ")
        return 1 if bad else 0
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = corpus_text(work)
        result = {"data": data_fingerprints(work, text)}
        result["train"] = train_fingerprints(work)
        result["generate"] = generation_fingerprints(work)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out}: " + ", ".join(f"{k} ({len(v)} items)" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
