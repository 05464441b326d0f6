"""The CUDA paths, checked in one short run on a GPU machine (none is on the CI box).

    python benchmarks/gpu_check.py                  # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu     # smoke test of the script (bf16 only)

It prints, for each precision (fp32, bf16, fp16 + GradScaler):
1. the fused head + loss against plain `F.cross_entropy` in fp32 (loss and gradient error);
2. real training steps of the `small` preset (B=8, T=256) and of `dtl info --fit 8GB`'s
   answer for the `qa` preset: `torch.cuda.max_memory_allocated` beside `dtl info`'s estimate;
3. a few `dtl train` steps end to end on the shared WikiText file (finite losses, a checkpoint
   that loads), if ../shared/data is there.
Record what it prints in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from shared_data import WIKITEXT

from dtl import ModelConfig, TransformerLM
from dtl.model.head_loss import linear_cross_entropy
from dtl.train.memory import estimate_memory, fit_options, parse_size, recommend
from dtl.train.precision import autocast, grad_scaler, resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def check_head_loss(device: torch.device, precision: str) -> None:
    torch.manual_seed(0)
    h = torch.randn(2048, 256, device=device, requires_grad=True)
    w = (torch.randn(50257, 256, device=device) * 0.02).requires_grad_()
    b = torch.zeros(50257, device=device, requires_grad=True)
    t = torch.randint(0, 50257, (2048,), device=device)
    ref = F.cross_entropy(h.float() @ w.float().T + b, t)
    ref.backward()
    ref_grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    p = resolve_precision(precision, device)
    with autocast(p, device):
        loss = linear_cross_entropy(h, w, b, t)
    loss.backward()
    errs = [
        ((x.grad - g).abs().max() / g.abs().max()).item()
        for x, g in zip((h, w, b), ref_grads, strict=True)
    ]
    print(
        f"  head+loss {precision}: loss {loss.item():.5f} vs fp32 {ref.item():.5f}; "
        f"max rel grad err h/W/b {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e}"
    )


def measure_step(
    device,
    precision: str,
    preset: str,
    batch: int,
    seq: int,
    accum: int = 1,
    checkpointing: bool = False,
) -> None:
    from dtl.train import enable_activation_checkpointing

    cfg = ModelConfig.preset(preset)
    p = resolve_precision(precision, device)
    est = estimate_memory(cfg, batch, seq, p.name, checkpointing, device.type, accum)["train_total"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = TransformerLM(cfg).to(device).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = grad_scaler(p, device)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    t0 = time.perf_counter()
    losses = []
    for _ in range(3):
        for _ in range(accum):
            with autocast(p, device):
                loss = model.loss(x, x.roll(-1, 1)) / accum
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item() * accum)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = float("nan")
    dt = (time.perf_counter() - t0) / 3
    print(
        f"  {preset} {p.name} B={batch} T={seq} accum={accum} ckpt={checkpointing}: "
        f"peak {peak / 2**20:,.0f} MiB, estimate {est / 2**20:,.0f} MiB "
        f"(ratio {est / peak:.2f}), {batch * seq * accum / dt:,.0f} tokens/s, losses "
        + " ".join(f"{v:.3f}" for v in losses)
    )
    del model, opt


def dtl_train_end_to_end(device: str, precision: str, work: Path, preset: str, steps: int) -> None:
    if not WIKITEXT.exists():
        print("  (no ../shared/data: skipping the dtl train run)")
        return
    dtl = [sys.executable, "-m", "dtl"]
    env_gpt2 = {"DTL_GPT2_DIR": str(WIKITEXT.parents[1] / "gpt2")}
    import os

    env = {**os.environ, **env_gpt2}
    data = work / "data"
    if not data.exists():
        subprocess.run(
            [*dtl, "prepare", str(WIKITEXT), "-o", str(data), "--max-length", "128"],
            check=True,
            env=env,
            capture_output=True,
        )
    out = work / f"run-{precision}"
    r = subprocess.run(
        [
            *dtl,
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--preset",
            preset,
            "--max-steps",
            str(steps),
            "--log-every",
            "5",
            "--eval-every",
            str(steps),
            "--eval-batches",
            "2",
            "--precision",
            precision,
            "--device",
            device,
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    rows = (
        [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if r.returncode == 0
        else []
    )
    print(
        f"  dtl train {preset} {precision}: exit {r.returncode}; "
        + ", ".join(f"step {x['step']} loss {x.get('loss', x.get('val_loss')):.4f}" for x in rows)
        + ("" if r.returncode == 0 else f"; stderr: {r.stderr.strip()[-300:]}")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
            f"bf16 supported: {torch.cuda.is_bf16_supported()}"
        )
        precisions = ["fp32", "bf16", "fp16"]
    else:  # a smoke test of this script: tiny sizes (CPU bf16 matmuls are ~60x slower)
        precisions = ["bf16"]
    preset, batch, seq, steps = (
        ("small", 8, 256, 20) if device.type == "cuda" else ("tiny", 2, 64, 5)
    )
    print("1. fused head + loss vs plain cross-entropy")
    for p in precisions:
        check_head_loss(device, p)
    print("2. training steps: measured peak vs dtl info's estimate")
    for p in precisions:
        measure_step(device, p, preset, batch, seq)
    budget = parse_size("8GB")
    best = recommend(fit_options(ModelConfig.preset("qa"), budget, 1024, 32, device=device.type))
    if best is not None and device.type == "cuda":
        print(f"  dtl info --preset qa --fit 8GB says: {best}")
        measure_step(
            device,
            best.precision,
            "qa",
            best.micro_batch,
            1024,
            best.grad_accum,
            best.activation_checkpointing,
        )
    print("3. dtl train end to end")
    with tempfile.TemporaryDirectory() as tmp:
        for p in precisions:
            dtl_train_end_to_end(args.device, p, Path(tmp), preset, steps)


if __name__ == "__main__":
    main()
