"""A decode step two ways, interleaved in one process: the model's own forward with the CPU
plan as its layout (`model(tokens[:, None], cache=..., last_only=True, layout=plan)`, the
route every step took before issue 21 item 3's second pass) and the lean step the token loop
now calls (`DecodePlan.step`, `dtl.generate.decode.decode_step`): the same kernels, so the
same logits bit for bit (checked: the greedy tokens of every run must match), minus the
Python between them.

For each format (`--dtype`) and batch: ms per step (best of `--repeats`, after a 16-token
prompt, greedy, `--new` steps), the ratio, and the operators per step that torch.profiler
records (all of them, and the top-level ones: each a Python-to-C++ dispatch).

    python benchmarks/bench_decode_step.py                      # 2 threads, batch 1 and 8
    python benchmarks/bench_decode_step.py --threads 1 --dtypes fp32
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import profile

from dtl import ModelConfig, TransformerLM
from dtl.generate.decode import plan_for
from dtl.model.dtype import to_inference_dtype

PROMPT = 16


def decode(model, plan, ids: torch.Tensor, steps: int, lean: bool) -> tuple[float, torch.Tensor]:
    """(seconds per step, the greedy tokens (B, steps + 1)) after prefilling `ids`."""
    cache = model.allocate_cache(ids.size(0), ids.size(1) + steps)
    with torch.no_grad():
        token = model(ids, cache=cache, last_only=True, layout=plan)[:, -1].argmax(-1)
        tokens = [token]
        start = time.perf_counter()
        for _ in range(steps):
            if lean:
                logits = plan.step(model, token, cache)
            else:
                logits = model(token[:, None], cache=cache, last_only=True, layout=plan)[:, -1]
            token = logits.argmax(-1)
            tokens.append(token)
        seconds = (time.perf_counter() - start) / steps
    return seconds, torch.stack(tokens, 1)


def ops_per_step(model, plan, ids: torch.Tensor, lean: bool, steps: int = 8) -> tuple[float, float]:
    """(all operator events, top-level ones) per step, prefill excluded (it is the same)."""
    counts = []
    for n in (1, steps):
        with profile() as prof:
            decode(model, plan, ids, n, lean)
        events = list(prof.events())
        counts.append((len(events), sum(e.cpu_parent is None for e in events)))
    (all0, top0), (all1, top1) = counts  # one step vs `steps` steps: the difference per step
    return (all1 - all0) / (steps - 1), (top1 - top0) / (steps - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", type=int, default=64, help="steps per run (default 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, small preset, prompt {PROMPT}, "
          f"{args.new} greedy steps, best of {args.repeats}")  # fmt: skip
    for dtype in args.dtypes:
        torch.manual_seed(0)
        model = to_inference_dtype(TransformerLM(ModelConfig.preset("small")).eval(), dtype)
        plan = plan_for(model)
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=g)
            best = {False: float("inf"), True: float("inf")}
            tokens = {}
            decode(model, plan, ids, 4, False)  # warm-up: the batch layout is made on first use
            for _ in range(args.repeats):
                for lean in (False, True):  # interleaved: A, B, A, B, ...
                    seconds, tokens[lean] = decode(model, plan, ids, args.new, lean)
                    best[lean] = min(best[lean], seconds)
            if not torch.equal(tokens[False], tokens[True]):
                raise SystemExit(f"{dtype} batch {batch}: the lean step drew other tokens")
            before, after = ops_per_step(model, plan, ids, False), ops_per_step(model, plan, ids, True)
            print(f"{dtype} batch {batch}: forward {1e3 * best[False]:.3f} ms/step, lean "
                  f"{1e3 * best[True]:.3f} ms/step ({best[False] / best[True]:.2f}x); ops/step "
                  f"{before[0]:.0f} -> {after[0]:.0f}, top-level {before[1]:.0f} -> {after[1]:.0f}; "
                  "same tokens")  # fmt: skip


if __name__ == "__main__":
    main()
