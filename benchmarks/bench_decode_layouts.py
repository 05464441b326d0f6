"""Why `dtl.generate.decode` cuts its weights into blocks: one row times each of the small preset's
weight shapes, the weights coming from memory (a 96 MB read before each timing flushes the
caches, as the 51 MB vocabulary head does in a real decode step), five ways:

    F.linear          the nn.Linear layout (out, in), what the model's forward uses
    addmm W^T         a transposed copy (in, out)
    cols/p            p blocks of whole columns, one `baddbmm`      (dtl.generate.decode, narrowing)
    rows/p            p blocks of rows + a sum, one `bmm`           (dtl.generate.decode, widening)

Each figure is the best of 15 per product; the ratio is against `F.linear` in the same run.

    python benchmarks/bench_decode_layouts.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dtl.generate.decode import SplitLinear

SHAPES = {  # name: (in, out) of the small preset (d_model 256, d_ff 1024, vocab 50257)
    "head": (256, 50257),
    "Q,K,V fused": (256, 768),
    "W_O": (256, 256),
    "FFN up": (256, 1024),
    "FFN down": (1024, 256),
}


def best_us(fn, flush: torch.Tensor, copies: int, repeats: int = 15) -> float:
    best = float("inf")
    for _ in range(repeats):
        flush.sum()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / copies * 1e6


def time_shape(n_in: int, out: int, flush: torch.Tensor) -> dict[str, float]:
    """us per product for each way, over six layers' worth of copies (one for the head)."""
    copies = 1 if out > 10_000 else 6
    torch.manual_seed(0)
    weights = [torch.randn(out, n_in) for _ in range(copies)]  # nn.Linear layout
    bias = torch.randn(out)
    x = torch.randn(1, n_in)
    transposed = [w.t().contiguous() for w in weights]
    ways = {
        "F.linear": lambda: [F.linear(x, w, bias) for w in weights],
        "addmm W^T": lambda: [torch.addmm(bias, x, w) for w in transposed],
    }
    for p in (2, 4, 8):
        cols = [SplitLinear.of([w], [bias], p, by_rows=False) for w in weights]
        ways[f"cols/{p}"] = lambda cols=cols: [s(x) for s in cols]
    for p in (2, 4):
        if n_in % p == 0:
            rows = [SplitLinear.of([w], [bias], p, by_rows=True) for w in weights]
            ways[f"rows/{p}"] = lambda rows=rows: [s(x) for s in rows]
    return {way: best_us(fn, flush, copies) for way, fn in ways.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flush = torch.ones(96 * 2**20 // 4)
    print(
        f"torch {torch.__version__}, {args.threads} threads, fp32, one row (B = 1), us per product"
    )
    for name, (n_in, out) in SHAPES.items():
        times = time_shape(n_in, out, flush)
        base = times["F.linear"]
        cells = "  ".join(f"{way} {t:7.1f} ({base / t:4.2f}x)" for way, t in times.items())
        print(f"{name:<12} {n_in:>4} x {out:<5}  {cells}")


if __name__ == "__main__":
    main()
