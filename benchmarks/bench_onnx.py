"""Decode speed of the ONNX export under onnxruntime beside DTL's own KV-cached decode.

The `small` preset with random weights (d_model 256, 6 layers, d_ff 1024, GPT-2 vocabulary),
fp32 on the CPU: a 16-token prompt and 128 new tokens, greedy, at batch 1 and 8, in one run.
DTL: `generate_tokens(..., temperature=0)` (its KV cache and CPU decode plan). onnxruntime:
the graph `dtl export --format onnx` writes, the prompt in one call and then one token per
call with the previous call's present keys/values as the past. Both draw the same tokens
(checked), so the ratio compares the same work.

    python benchmarks/bench_onnx.py                    # batch 1 and 8, 2 threads
    python benchmarks/bench_onnx.py --batches 1 --repeats 1 --new 16   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dtl import ModelConfig, TransformerLM
from dtl.export.onnx import export_onnx
from dtl.generate import generate_tokens

PROMPT = 16


def timed(fn, repeats: int) -> tuple[float, object]:
    """(best wall time of `repeats` calls after one warm-up, the last result)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=int, default=128, help="new tokens per row (default 128)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.preset("small")).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, "
          f"fp32; small preset, prompt {PROMPT}, {args.new} new tokens, greedy")  # fmt: skip
    figures: dict = {"threads": args.threads, "new_tokens": args.new, "rows": []}
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=g)
        dtl_s, dtl_out = timed(
            lambda ids=ids: generate_tokens(model, ids, args.new, temperature=0), args.repeats
        )
        ort_s, ort_out = timed(lambda ids=ids: ort_greedy(session, ids.numpy(), args.new),
                               args.repeats)  # fmt: skip
        same = np.array_equal(dtl_out.numpy(), ort_out)
        row = {"batch": batch, "dtl_tokens_per_s": batch * args.new / dtl_s,
               "ort_tokens_per_s": batch * args.new / ort_s, "same_tokens": bool(same)}  # fmt: skip
        row["ort_vs_dtl"] = row["ort_tokens_per_s"] / row["dtl_tokens_per_s"]
        figures["rows"].append(row)
        print(f"batch {batch}: dtl KV cache {row['dtl_tokens_per_s']:8.1f} tok/s   onnxruntime "
              f"{row['ort_tokens_per_s']:8.1f} tok/s   onnxruntime/dtl {row['ort_vs_dtl']:.2f}x"
              f"   same tokens: {same}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
