"""Training throughput: `dtl train`'s default precision vs its fp32, and vs Hugging Face
GPT2LMHeadModel, same run.

The `small` preset (d_model 256, 8 heads, 6 layers, d_ff 1024, vocab 50,257) at batch 8 x 256
tokens on CPU, three step functions on the same batches:
- dtl fp32: `--precision fp32`, eager (exact fp32);
- dtl auto: the default `--precision auto` (bf16 on a CPU with AVX512-BF16 or AMX, else fp32:
  `dtl.train.precision`), eager; on such a CPU that is bf16 weight copies of fp32 masters;
- dtl bf16 autocast: where auto trains bf16 weight copies, the same run with plain bf16
  autocast instead (what auto was before, and what FSDP still uses), so the copies' gain is
  measured in the same run;
- HF: a GPT2LMHeadModel of the same dimensions, fp32, with the same AdamW settings.
MFU = achieved model FLOP/s over the peak FLOP/s of a large matmul in the dtype the step's
matmuls run in (fp32 or bf16), measured in this same run (this machine's real peak, not a
datasheet's). Model FLOPs per token = 6 x (matmul parameters) + 12 x layers x T x d_model
(attention scores and values, the PaLM convention), counted from the config.

The steps are timed in turns (fp32, auto, autocast, HF, fp32, ...) so a busy machine slows all alike,
and the best time of each is kept. With --loss-steps N (e.g. 300) it then trains N steps of
`dtl train` at fp32 and at auto from the same seed on the same batches and prints both losses
at the same steps (the goal of issue 21: within 0.02; ~15 minutes for 300 on 2 cores).

    python benchmarks/bench_train.py [--steps 6] [--threads 2] [--loss-steps 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peers import gpt2_peer
from shared_data import WIKITEXT

ROOT = Path(__file__).resolve().parents[1]
GPT2_DIR = ROOT.parent / "shared" / "data" / "gpt2"


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul in `dtype`, the best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
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


def dtl_config(data_dir: Path, out: Path, precision: str, **settings):
    from dtl.train import TrainConfig

    base = {"preset": "small", "seq_len": 256, "batch_size": 8, "lr": 6e-4, "warmup_steps": 0,
            "device": "cpu", "progress": False, "max_steps": 1000}  # fmt: skip
    return TrainConfig(
        data=str(data_dir), out=str(out), precision=precision, **{**base, **settings}
    )


def dtl_trainer(data_dir: Path, out: Path, precision: str):
    from dtl.train import Trainer

    return Trainer(dtl_config(data_dir, out, precision))


def autocast_trainer(data_dir: Path, out: Path):
    """The auto run with bf16 autocast instead of bf16 weight copies (else the same)."""
    import dataclasses

    from dtl.train import Trainer
    from dtl.train.setup import setup_run

    setup = setup_run(dtl_config(data_dir, out, "auto"))
    prec = dataclasses.replace(setup.prec, weight_copies=False, why="bf16 autocast")
    return Trainer(setup=dataclasses.replace(setup, prec=prec))


def one_step(trainer):
    """A step function of one batch: the trainer's optimizer step."""
    return lambda batch: trainer.train_step([batch])


def loss_comparison(data_dir: Path, tmp: Path, steps: int) -> None:
    """`dtl train` for `steps` steps at fp32 and at auto (same seed, same batches, the default
    lr schedule): both losses at the same steps, and the largest difference."""
    import json

    from dtl.train import train

    losses = {}
    for precision in ("fp32", "auto"):
        out = tmp / f"loss-{precision}"
        cfg = dtl_config(data_dir, out, precision, lr=None, warmup_steps=None, max_steps=steps,
                         log_every=1, eval_every=steps, save_every=steps)  # fmt: skip
        start = time.perf_counter()
        train(cfg)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        losses[precision] = {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
        print(f"{steps} steps at {precision}: {time.perf_counter() - start:.0f} s", flush=True)
    fp32, auto = losses["fp32"], losses["auto"]
    shown = sorted({1, 10, 50, 100, 200, steps} & set(fp32))
    print("step   loss fp32   loss auto   |difference|")
    for step in shown:
        print(
            f"{step:4d}   {fp32[step]:9.4f}   {auto[step]:9.4f}   {abs(fp32[step] - auto[step]):.4f}"
        )
    last = [s for s in fp32 if s > steps - 10]
    mean_diff = sum(auto[s] - fp32[s] for s in last) / len(last)
    print(f"mean difference over the last {len(last)} steps (auto - fp32): {mean_diff:+.4f}")


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
    parser.add_argument("--loss-steps", type=int, default=0,
                        help="then train this many steps at fp32 and at auto, and compare "
                        "their losses (0: skip)")  # fmt: skip
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
        fp32 = dtl_trainer(data, Path(tmp) / "fp32", "fp32")
        auto = dtl_trainer(data, Path(tmp) / "auto", "auto")
        amp = autocast_trainer(data, Path(tmp) / "amp") if auto.prec.weight_copies else None
        it = iter(fp32.train_loader)
        batches = [next(it) for _ in range(2 + args.steps)]
        cfg = fp32.model_config
        tokens = 8 * 256

        hf, hf_step = hf_step_fn(cfg)
        low = auto.prec.dtype or torch.float32  # the dtype auto's matmuls run in
        peaks = {dt: matmul_peak(dt) for dt in dict.fromkeys((torch.float32, low))}
        steps = {
            "fp32": one_step(fp32),
            "auto": one_step(auto),
            **({"amp": one_step(amp)} if amp is not None else {}),
            "hf": hf_step,
        }
        best = time_interleaved(steps, batches, args.steps)
        for dt in peaks:  # the better of before and after (noisy machine)
            peaks[dt] = max(peaks[dt], matmul_peak(dt))

        fpt = flops_per_token(cfg.d_model, cfg.n_layers, cfg.d_ff, cfg.vocab_size, 256)
        tps = {name: tokens / s for name, s in best.items()}
        print(
            f"torch {torch.__version__}, {args.threads} threads, small preset, B=8 T=256 "
            f"vocab {cfg.vocab_size}, CPU; auto = {auto.prec.name} ({auto.prec.why})"
        )
        for dt, peak in peaks.items():
            print(
                f"matmul peak (2048^3 {str(dt).removeprefix('torch.')}): {peak / 1e9:.1f} GFLOP/s"
            )
        print(f"model FLOPs per token: {fpt / 1e6:.1f} M")
        rows = [
            ("dtl fp32 (eager)", "fp32", torch.float32, fp32.model.num_parameters()),
            (f"dtl auto ({auto.prec.name})", "auto", low, auto.model.num_parameters()),
            *([("dtl bf16 autocast", "amp", low, amp.model.num_parameters())] if amp else []),
            ("HF GPT2LMHeadModel", "hf", torch.float32, sum(p.numel() for p in hf.parameters())),
        ]
        for label, name, dt, n_params in rows:
            print(
                f"{label:20s} {best[name] * 1e3:8.1f} ms  {tps[name]:8,.0f} tokens/s  MFU "
                f"{tps[name] * fpt / peaks[dt]:5.1%} of the {str(dt).removeprefix('torch.')} "
                f"peak  ({n_params:,} params{', tied embeddings' if name == 'hf' else ''})"
            )
        print(f"ratio dtl auto / dtl fp32 tokens/s: {tps['auto'] / tps['fp32']:.2f}x")
        if amp is not None:
            print(f"ratio dtl bf16 autocast / dtl fp32 tokens/s: {tps['amp'] / tps['fp32']:.2f}x")
        print(f"ratio dtl fp32 / HF tokens/s: {tps['fp32'] / tps['hf']:.2f}x")
        del fp32, auto, amp, hf
        if args.loss_steps:
            loss_comparison(data, Path(tmp), args.loss_steps)


if __name__ == "__main__":
    main()
