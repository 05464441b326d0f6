"""A decode step three ways, interleaved in one process: the model's own forward with the CPU
plan as its layout (`model(tokens[:, None], cache=..., last_only=True, layout=plan)`, the
route every step took before issue 21 item 3's second pass), the eager step
(`DecodePlan.eager_step`, `dtl.generate.decode.decode_step`: the same kernels, so the same
logits bit for bit, checked: the greedy tokens of every run must match, minus the Python
between them), and DTL's step kernel (`DecodePlan.step` where it is built,
`dtl.generate.step_kernel`: the whole step in one C call; the same maths in another order and,
for bf16 and int8, fp32 activations, so its greedy tokens are counted against the forward's).

For each format (`--dtype`) and batch: ms per step (best of `--repeats`, after a 16-token
prompt, greedy, `--new` steps), the ratios, and the operators per step that torch.profiler
records for the forward and the eager step (all of them, and the top-level ones: each a
Python-to-C++ dispatch).

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


WAYS = ("forward", "eager", "kernel")


def decode(model, plan, ids: torch.Tensor, steps: int, way: str) -> tuple[float, torch.Tensor]:
    """(seconds per step, the greedy tokens (B, steps + 1)) after prefilling `ids`."""
    cache = model.allocate_cache(ids.size(0), ids.size(1) + steps)
    with torch.no_grad():
        token = model(ids, cache=cache, last_only=True, layout=plan)[:, -1].argmax(-1)
        tokens = [token]
        start = time.perf_counter()
        for _ in range(steps):
            if way == "kernel":
                logits = plan.step(model, token, cache)
            elif way == "eager":
                logits = plan.eager_step(model, token, cache)
            else:
                logits = model(token[:, None], cache=cache, last_only=True, layout=plan)[:, -1]
            token = logits.argmax(-1)
            tokens.append(token)
        seconds = (time.perf_counter() - start) / steps
    return seconds, torch.stack(tokens, 1)


def ops_per_step(model, plan, ids: torch.Tensor, way: str, steps: int = 8) -> tuple[float, float]:
    """(all operator events, top-level ones) per step, prefill excluded (it is the same)."""
    counts = []
    for n in (1, steps):
        with profile() as prof:
            decode(model, plan, ids, n, way)
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
            best = dict.fromkeys(WAYS, float("inf"))
            tokens = {}
            decode(model, plan, ids, 4, "forward")  # warm-up: the batch layout is made on first use
            decode(model, plan, ids, 4, "kernel")  # and the kernel's copy
            for _ in range(args.repeats):
                for way in WAYS:  # interleaved: A, B, C, A, B, C, ...
                    seconds, tokens[way] = decode(model, plan, ids, args.new, way)
                    best[way] = min(best[way], seconds)
            if not torch.equal(tokens["forward"], tokens["eager"]):
                raise SystemExit(f"{dtype} batch {batch}: the eager step drew other tokens")
            same = float((tokens["kernel"] == tokens["forward"]).float().mean())
            before, after = (ops_per_step(model, plan, ids, w) for w in ("forward", "eager"))
            f, e, k = (1e3 * best[w] for w in WAYS)
            print(f"{dtype} batch {batch}: forward {f:.3f} ms/step, eager {e:.3f} ({f / e:.2f}x), "
                  f"kernel {k:.3f} ({e / k:.2f}x the eager step); ops/step {before[0]:.0f} -> "
                  f"{after[0]:.0f}, top-level {before[1]:.0f} -> {after[1]:.0f}; kernel's greedy "
                  f"tokens as the forward's: {same:.0%}")  # fmt: skip

if __name__ == "__main__":
    main()
