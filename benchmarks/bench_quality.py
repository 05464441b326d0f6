"""Quality for a fixed token budget: DTL's defaults, DTL with Muon, and a nanoGPT-style
reference, on the same model, tokenizer, split and token budget, two seeds each, in one run.

Data: the shared WikiText-2 raw test file as one text; a byte-level BPE (2,048 tokens) trained
on its first 90%; prepared as one document, so `dtl prepare` holds out its last 10% of tokens
as the validation split (no token in both). Model (issue 14's budget): d_model 128, 4 heads,
4 layers, d_ff 512, dropout 0 (nanoGPT's pretraining default), T=128, batch 8, 1,562 steps
(1.6M tokens).

Recipes (every one sees `steps * batch * T` training tokens):
  dtl-default  `dtl train` with no lr/warmup flags (LR_RULE, WARMUP_RULE), shuffled packed rows
  dtl-muon     the same with --optimizer muon (Muon lr 0.02 for the blocks' matrices)
  dtl-ref-hp   (with --recipes) `dtl train` with the reference's lr and warmup; at d_model 128
               it is dtl-default (LR_RULE gives 1e-3 there)
  nanogpt      a plain loop written here: random windows of the train tokens, torch's AdamW
               (lr 1e-3, betas 0.9/0.95, weight decay 0.1 on matrices), 5% warmup, cosine to
               10%, clip 1.0

dtl-default and nanogpt then differ only in the data order (shuffled packed rows vs random
windows) and the loop's code, so their gap is what random windows are worth.

Printed: validation bits per byte (loss in bits over the UTF-8 bytes of the scored tokens,
independent of the tokenizer), scored over every validation row of T tokens (the length
trained on), per recipe per seed and the mean.

    python benchmarks/bench_quality.py                 # the full budget (1,562 steps)
    python benchmarks/bench_quality.py --steps 300     # a quick look
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
MODEL = {"d_model": 128, "n_heads": 4, "n_layers": 4, "d_ff": 512}
RECIPES = ("dtl-default", "dtl-muon", "dtl-ref-hp", "nanogpt")
DEFAULT_RECIPES = ["dtl-default", "dtl-muon", "nanogpt"]


@torch.no_grad()
def val_bits_per_byte(model, data_dir: Path, tokenizer, batch_size: int, seq_len: int) -> float:
    """Bits per byte over every val row of `seq_len` tokens."""
    from dtl.data.loader import BatchLoader

    loader = BatchLoader(data_dir, "val", batch_size, shuffle=False, seq_len=seq_len)
    token_bytes = [len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)]
    model.eval()
    nats, n_bytes = 0.0, 0
    for _, batch in zip(range(loader.batches_per_epoch), loader, strict=False):
        logits = model(batch["input_ids"])  # (B, T, V)
        targets = batch["targets"]  # (B, T), -100 where not scored
        nats += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        n_bytes += sum(token_bytes[i] for i in targets[targets != -100].tolist())
    return nats / (math.log(2) * n_bytes)


def run_dtl(recipe: str, data: Path, out: Path, args, seed: int):
    """One `dtl train` run; returns (model, tokenizer)."""
    from dtl.train import TrainConfig, Trainer

    extra = {
        "dtl-default": {},
        "dtl-muon": {"optimizer": "muon"},
        "dtl-ref-hp": {"lr": args.ref_lr, "warmup_steps": round(0.05 * args.steps)},
    }[recipe]
    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        preset="tiny",
        **MODEL,
        dropout=args.dropout,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.steps,
        log_every=max(1, args.steps // 4),
        eval_every=args.steps,
        save_every=args.steps,
        device="cpu",
        precision="fp32",
        progress=False,
        seed=seed,
        **extra,
    )
    trainer = Trainer(cfg)
    trainer.run()
    return trainer.model, trainer.tokenizer


def run_nanogpt(data: Path, train_ids: torch.Tensor, args, seed: int):
    """The reference: nanoGPT's loop on random windows, written independently of dtl.train."""
    from dtl import ModelConfig, TransformerLM
    from dtl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(data))
    torch.manual_seed(seed)
    config = ModelConfig.preset(
        "tiny", vocab_size=tokenizer.vocab_size, dropout=args.dropout, **MODEL
    )
    model = TransformerLM(config)
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    others = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=args.ref_lr,
        betas=(0.9, 0.95),
    )
    warmup, lr_min = max(1, round(0.05 * args.steps)), args.ref_lr / 10
    T, B = args.seq_len, args.batch_size
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(args.steps):
        if step < warmup:
            lr = args.ref_lr * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, args.steps - warmup)
            lr = lr_min + 0.5 * (args.ref_lr - lr_min) * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - T - 1, (B,), generator=gen)
        x = torch.stack([train_ids[s : s + T] for s in starts])  # (B, T)
        y = torch.stack([train_ids[s + 1 : s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model, tokenizer


def prepare_data(tmp: Path, args) -> tuple[Path, torch.Tensor]:
    """The tokenizer (on the first 90% of the text), the prepared dir, the train token ids."""
    from dtl.data.prepare import prepare
    from dtl.tokenizer import train_tokenizer

    text = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n")
    cut = int(0.9 * len(text))
    (tmp / "head.txt").write_text(text[:cut], encoding="utf-8")
    (tmp / "all.txt").write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer(
        [tmp / "head.txt"], args.vocab_size, tmp / "tok", show_progress=False
    )
    # One document: prepare splits its tokens, the last 10% to val.
    summary = prepare(
        [tmp / "all.txt"],
        tmp / "data",
        tokenizer=str(tmp / "tok"),
        kind="text",
        max_length=args.seq_len,
        val_fraction=0.1,
        seed=0,
        progress=False,
    )
    ids = tokenizer.encode(text)
    n_train = summary["train"]["tokens"]
    print(
        f"WikiText-2 test file: {n_train:,} train / {summary['val']['tokens']:,} val tokens "
        f"(split {summary.get('split', '?')}), BPE {args.vocab_size}; model {MODEL}, "
        f"dropout {args.dropout}, B={args.batch_size} T={args.seq_len}, {args.steps} steps = "
        f"{args.steps * args.batch_size * args.seq_len:,} tokens per run",
        flush=True,
    )
    return tmp / "data", torch.tensor(ids[: int(0.9 * len(ids))], dtype=torch.long)


def run_one(job: tuple) -> tuple[str, int, float]:
    """One recipe with one seed: (recipe, seed, val bits per byte)."""
    recipe, seed, data, train_ids, tmp, args = job
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if recipe == "nanogpt":
        model, tok = run_nanogpt(data, train_ids, args, seed)
    else:
        model, tok = run_dtl(recipe, data, tmp / f"{recipe}-{seed}", args, seed)
    bpb = val_bits_per_byte(model, data, tok, args.batch_size, args.seq_len)
    took = time.perf_counter() - started
    print(f"{recipe:12s} seed {seed}: {bpb:.4f} bits/byte ({took:.0f} s)", flush=True)
    return recipe, seed, bpb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1562)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--ref-lr", type=float, default=1e-3, help="the reference's lr")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=RECIPES)
    # One thread: a tiny model gains little from two, and a shared machine stalls them.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    parser.add_argument("--work", help="folder for the temporary data and runs (default: /tmp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        data, train_ids = prepare_data(tmp, args)
        jobs = [(r, seed, data, train_ids, tmp, args) for r in args.recipes for seed in args.seeds]
        # Runs are independent (own seed, own run dir): --jobs N runs N at once, in processes.
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
            for recipe, _seed, bpb in pool.map(run_one, jobs):
                results.setdefault(recipe, []).append(bpb)
    print("\nrecipe        " + "  ".join(f"seed {s}" for s in args.seeds) + "    mean")
    for recipe, values in results.items():
        cells = "  ".join(f"{v:.4f}" for v in values)
        print(f"{recipe:12s}  {cells}  {statistics.mean(values):.4f}")
    if "nanogpt" in results:
        ref = statistics.mean(results["nanogpt"])
        for recipe, values in results.items():
            if recipe != "nanogpt":
                print(f"{recipe} - nanogpt: {statistics.mean(values) - ref:+.4f} bits/byte")


if __name__ == "__main__":
    main()
