"""Decode speed of the ONNX export under onnxruntime beside DTL's own KV-cached decode,
DTL in fp32, bf16 and int8 (`--dtype`, `dtl.model.dtype`).

The `small` preset with random weights (d_model 256, 6 layers, d_ff 1024, GPT-2 vocabulary)
on the CPU: a 16-token prompt and 128 new tokens, greedy, at batch 1 and 8, in one run.
DTL: `generate_tokens(..., temperature=0)` (its KV cache and its decode step, DTL's step
kernel where it is built, in the model's dtype). Each figure is the best of `--repeats` runs,
the peers taking turns run by run (`interleaved`). onnxruntime: the fp32 graph `dtl export --format onnx` writes, the prompt in one call
and then one token per call with the previous call's present keys/values as the past. DTL
fp32 and onnxruntime draw the same tokens (checked), so their ratio compares the same work;
bf16 and int8 are timed on the same prompts, and the share of their tokens that match fp32's
is printed (random weights give near-tied logits, so this is a stress test, not a quality
figure). Every ratio is against onnxruntime fp32.

Quality on a trained model: `--model RUN_DIR --text HELD_OUT.txt` also prints each dtype's
perplexity on the text (as `dtl eval` computes it, and through the decode steps) and how many
of 32 greedy tokens after each of the text's first prompts match fp32's.

    python benchmarks/bench_onnx.py                    # batch 1 and 8, 2 threads
    python benchmarks/bench_onnx.py --batches 1 --repeats 1 --new 16   # a smoke run
    python benchmarks/bench_onnx.py --model runs/quickstart --text held-out.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

# ruff: noqa: E402  (torch must load after the wait policy is set)
from dtl.threads import set_wait_policy

set_wait_policy(verb="generate")  # torch's OpenMP waits as under `dtl generate` (dtl.threads)

import numpy as np
import torch

from dtl import ModelConfig, TransformerLM
from dtl.export.onnx import export_onnx
from dtl.generate import decode, generate_tokens
from dtl.model.dtype import to_inference_dtype

PROMPT = 16
DTYPES = ("fp32", "bf16", "int8")


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """({name: best wall time of `repeats` calls}, {name: its last result}), after one warm-up
    call each. The calls take turns (A, B, C, A, B, C, ...): this box's memory bandwidth, which
    bounds every decoder here, drifts by tens of percent from minute to minute, and taking
    turns gives each peer the same windows."""
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best, results


def ort_greedy(session, ids: np.ndarray, new: int) -> np.ndarray:
    """Greedy decoding of a (B, T) batch through the graph's past keys/values."""
    names = [o.name for o in session.get_outputs()]
    B = ids.shape[0]
    past = {}
    for node in session.get_inputs():
        if node.name.startswith("past_key_values."):
            past[node.name] = np.zeros((B, node.shape[1], 0, node.shape[3]), dtype=np.float32)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **past}
    out_tokens = [ids]
    total = ids.shape[1]
    for _ in range(new):
        out = dict(zip(names, session.run(None, feeds), strict=True))
        token = out["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]  # (B, 1)
        out_tokens.append(token)
        total += 1
        feeds = {"input_ids": token, "attention_mask": np.ones((B, total), dtype=np.int64)}
        feeds |= {n.replace("present.", "past_key_values."): out[n] for n in names[1:]}
    return np.concatenate(out_tokens, axis=1)


def step_perplexity(model: TransformerLM, ids: list[int], window: int) -> float:
    """The perplexity of `ids` with every prediction made by the token loop's decode step
    (`DecodePlan.step`: DTL's step kernel where it is built), from an empty KV cache at the
    start of each window of `window` tokens: what generation computes, where `dtl eval`'s
    perplexity is the forward's."""
    plan = decode.plan_for(model)
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window + 1]
            cache = model.allocate_cache(1, len(chunk))
            for t in range(len(chunk) - 1):
                logits = plan.step(model, torch.tensor([chunk[t]]), cache)  # (1, V)
                nll -= float(torch.log_softmax(logits[0], -1)[chunk[t + 1]])
                n += 1
    return math.exp(nll / n)


def quality(spec: str, text_path: str, continuations: int = 8, new: int = 32) -> dict:
    """Each dtype's perplexity on the held-out text (the forward's, as `dtl eval` computes it,
    and the decode steps', `step_perplexity`), and how many of `new` greedy tokens after each
    of the text's first `continuations` 32-token prompts agree with fp32's (up to the first
    difference, and in all)."""
    from dtl.generate.evaluate import evaluate_lm
    from dtl.model.store import load_model

    text = Path(text_path).read_text(encoding="utf-8")
    out: dict = {}
    reference = None
    for dtype in DTYPES:
        model, tok = load_model(spec, dtype=dtype)
        ppl = evaluate_lm(model, tok, [text], 8, None, False)["perplexity"]
        ids = tok.encode(text)
        steps = step_perplexity(model, ids, model.config.context)
        prompts = [ids[i * 32 : (i + 1) * 32] for i in range(continuations)]
        greedy = [generate_tokens(model, torch.tensor([p]), new, temperature=0)[0, 32:].tolist()
                  for p in prompts if len(p) == 32]  # fmt: skip
        reference = reference or greedy
        prefix = [next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), len(g))
                  for g, r in zip(greedy, reference, strict=True)]  # fmt: skip
        same = sum(a == b for g, r in zip(greedy, reference, strict=True) for a, b in zip(g, r, strict=True))
        out[dtype] = {"perplexity": ppl, "step_perplexity": steps, "same_tokens": same,
                      "of": sum(map(len, greedy)), "same_prefix": prefix}  # fmt: skip
        base, step_base = out["fp32"]["perplexity"], out["fp32"]["step_perplexity"]
        print(f"{dtype}: perplexity {ppl:.3f} ({100 * (ppl / base - 1):+.2f}% vs fp32), decode "
              f"steps' {steps:.3f} ({100 * (steps / step_base - 1):+.2f}%); greedy tokens as "
              f"fp32's: {same}/{out[dtype]['of']}, identical prefixes {prefix}")  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=int, default=128, help="new tokens per row (default 128)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--model", help="a trained model: also report each dtype's quality")
    parser.add_argument("--text", help="with --model: held-out text to measure it on")
    parser.add_argument("--block-threads", action="store_true",
                        help="also time each dtype with the other choice of threads for the blocks "
                        "(dtl.generate.decode.ONE_ROW_/SEVERAL_ROWS_BLOCK_THREADS: 1 <-> all)")  # fmt: skip
    args = parser.parse_args()
    if bool(args.model) != bool(args.text):
        parser.error("--model and --text go together")

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.preset("small")).eval()
    models = {d: to_inference_dtype(copy.deepcopy(model), d) for d in DTYPES}
    if args.block_threads:  # the same weights, each plan built with the other thread choice
        chosen = decode.block_threads
        decode.block_threads = lambda table, d: None if chosen(table, d) else 1
        for d in DTYPES:
            models[f"{d}-flipped"] = variant = copy.deepcopy(models[d])
            decode.plan_for(variant).for_rows(max(args.batches))  # both layouts, built now
        decode.block_threads = chosen
        tables = (decode.ONE_ROW_BLOCK_THREADS, decode.SEVERAL_ROWS_BLOCK_THREADS)
        print("block threads, one row / several:",
              {d: tuple(chosen(t, d) for t in tables) for d in DTYPES}, "('flipped': the other)")  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads; "
          f"small preset, prompt {PROMPT}, {args.new} new tokens, greedy")  # fmt: skip
    figures: dict = {"threads": args.threads, "new_tokens": args.new, "rows": []}
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=g)
        fns = {"ort": lambda ids=ids: ort_greedy(session, ids.numpy(), args.new)}
        for dtype, m in models.items():
            fns[dtype] = lambda ids=ids, m=m: generate_tokens(m, ids, args.new, temperature=0)
        best, outs = interleaved(fns, args.repeats)
        ort_out = outs.pop("ort")
        row = {"batch": batch, "ort_tokens_per_s": batch * args.new / best["ort"]}
        line = [f"batch {batch}: onnxruntime fp32 {row['ort_tokens_per_s']:7.1f} tok/s"]
        for dtype in models:
            rate = batch * args.new / best[dtype]
            row[f"dtl_{dtype}_tokens_per_s"] = rate
            row[f"dtl_{dtype}_vs_ort"] = rate / row["ort_tokens_per_s"]
            new_tokens = outs[dtype][:, PROMPT:]
            row[f"dtl_{dtype}_same_as_fp32"] = float(
                (new_tokens == outs["fp32"][:, PROMPT:]).float().mean()
            )
            if dtype.endswith("-flipped"):  # same weights, same kernels: same tokens
                assert torch.equal(outs[dtype], outs[dtype.split("-")[0]]), dtype
            line.append(f"dtl {dtype} {rate:7.1f} tok/s ({row[f'dtl_{dtype}_vs_ort']:.2f}x)")
        row["same_tokens"] = bool(np.array_equal(outs["fp32"].numpy(), ort_out))
        row["dtl_tokens_per_s"] = row["dtl_fp32_tokens_per_s"]  # the names before bf16/int8
        row["ort_vs_dtl"] = row["ort_tokens_per_s"] / row["dtl_tokens_per_s"]
        figures["rows"].append(row)
        print("   ".join(line) + f"   fp32 same tokens as onnxruntime: {row['same_tokens']}; "
              f"bf16/int8 tokens as fp32's: {row['dtl_bf16_same_as_fp32']:.0%}/"
              f"{row['dtl_int8_same_as_fp32']:.0%}")  # fmt: skip
    if args.model:
        figures["quality"] = quality(args.model, args.text)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
