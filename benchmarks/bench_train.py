"""Training throughput: `dtl train`'s own step vs Hugging Face GPT2LMHeadModel, same run.

The `small` preset (d_model 256, 8 heads, 6 layers, d_ff 1024, vocab 50,257) at batch 8 x 256
tokens, fp32 on CPU. The peer is a GPT2LMHeadModel of the same dimensions, trained with the
same AdamW settings on the same batches. MFU = achieved model FLOP/s over the peak FLOP/s of
a large fp32 matmul measured in this same run (so it is this machine's real peak, not a
datasheet's). Model FLOPs per token = 6 x (matmul parameters) + 12 x layers x T x d_model
(attention scores and values, the PaLM convention), counted from the config.

Each step is timed in turns with the peer's and the best time of each is kept.

    python benchmarks/bench_train.py [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peers import gpt2_peer

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
GPT2_DIR = ROOT.parent / "shared" / "data" / "gpt2"


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n fp32 matmul, the best of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(d: int, layers: int, d_ff: int, vocab: int, seq: int) -> float:
    matmul_params = layers * (4 * d * d + 2 * d * d_ff) + d * vocab  # blocks + head
    return 6 * matmul_params + 12 * layers * seq * d


def time_interleaved(steps: dict, batches, n: int) -> dict[str, float]:
    """Best seconds per step of each named step function, run in turns (A, B, A, B, ...) so
    a busy machine slows both alike; two warm-up steps each first."""
    for step in steps.values():
        for b in batches[:2]:
            step(b)
    best = {name: float("inf") for name in steps}
    for b in batches[2 : 2 + n]:
        for name, step in steps.items():
            t = time.perf_counter()
            step(b)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def dtl_trainer(data_dir: Path, out: Path):
    from dtl.train import TrainConfig, Trainer

    cfg = TrainConfig(
        data=str(data_dir),
        out=str(out),
        preset="small",
        seq_len=256,
        batch_size=8,
        lr=6e-4,
        warmup_steps=0,
        device="cpu",
        precision="fp32",
        progress=False,
        max_steps=1000,
    )
    return Trainer(cfg)


def hf_step_fn(config, lr: float = 6e-4):
    hf = gpt2_peer(config)
    hf.config._attn_implementation = "sdpa"
    hf.train()
    # The same fused AdamW dtl uses, so the optimizer is no part of the difference.
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(batch):
        ids, targets = batch["input_ids"], batch["targets"]
        logits = hf(input_ids=ids).logits  # (B, T, V); HF's own shift is bypassed: targets
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return hf, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import os

    os.environ.setdefault("DTL_GPT2_DIR", str(GPT2_DIR))
    from dtl.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(
            [WIKITEXT],
            data,
            tokenizer="gpt2",
            kind="wikitext",
            max_length=256,
            val_fraction=0.1,
            progress=False,
        )
        trainer = dtl_trainer(data, Path(tmp) / "run")
        it = iter(trainer.train_loader)
        batches = [next(it) for _ in range(2 + args.steps)]
        cfg = trainer.model_config
        tokens = 8 * 256

        hf, hf_step = hf_step_fn(cfg)
        peak = matmul_peak()
        best = time_interleaved(
            {"dtl": lambda b: trainer.train_step([b]), "hf": hf_step}, batches, args.steps
        )
        dtl_s, hf_s = best["dtl"], best["hf"]
        peak = max(peak, matmul_peak())  # the better of before and after (noisy machine)

    fpt = flops_per_token(cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.vocab_size, 256)
    dtl_tps, hf_tps = tokens / dtl_s, tokens / hf_s
    print(
        f"torch {torch.__version__}, {args.threads} threads, small preset, B=8 T=256 "
        f"vocab {cfg.vocab_size}, fp32 CPU"
    )
    print(f"matmul peak (2048^3 fp32): {peak / 1e9:.1f} GFLOP/s")
    print(f"model FLOPs per token: {fpt / 1e6:.1f} M")
    print(
        f"dtl train step:      {dtl_s * 1e3:8.1f} ms  {dtl_tps:8,.0f} tokens/s  "
        f"MFU {dtl_tps * fpt / peak:5.1%}  ({trainer.model.num_parameters():,} params)"
    )
    print(
        f"HF GPT2LMHeadModel:  {hf_s * 1e3:8.1f} ms  {hf_tps:8,.0f} tokens/s  "
        f"MFU {hf_tps * fpt / peak:5.1%}  ({sum(p.numel() for p in hf.parameters()):,} params, "
        "tied embeddings)"
    )
    print(f"ratio dtl / HF tokens/s: {dtl_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
