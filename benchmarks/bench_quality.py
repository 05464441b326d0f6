"""Quality for a fixed token budget: dtl train's recipe vs the spec's plain recipe, same run.

The `tiny` preset trains on the shared WikiText-2 file, split by article (no article is in
both train and val), with an 8k byte-level BPE trained on that file. Both runs see the same
batches in the same order for the same number of tokens and the same peak learning rate and
cosine decay, dropout 0.1 (the preset's); they differ only in what the spec leaves out:

  dtl:   linear warmup (`--warmup`, 100 steps), weight decay on weight matrices only
  plain: no warmup, weight decay on every parameter (embeddings, biases, LayerNorms too)

Printed: validation loss (nats/token) over the whole val split and bits per byte (the loss
in bits divided by the UTF-8 bytes those tokens stand for, so it does not depend on the
tokenizer).

    python benchmarks/bench_quality.py [--steps 600] [--batch-size 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


@torch.no_grad()
def val_loss_and_bpb(model, data_dir: Path, tokenizer, batch_size: int) -> tuple[float, float]:
    """Token-mean loss over every val row, and bits per byte of the target tokens."""
    from dtl.data.loader import BatchLoader

    loader = BatchLoader(data_dir, "val", batch_size, shuffle=False)
    token_bytes = [len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)]
    model.eval()
    nats, tokens, n_bytes = 0.0, 0, 0
    for _, batch in zip(range(loader.batches_per_epoch), loader, strict=False):
        logits = model(batch["input_ids"])  # (B, T, V)
        targets = batch["targets"]
        nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                reduction="sum").item()
        scored = targets[targets != -100]
        tokens += scored.numel()
        n_bytes += sum(token_bytes[i] for i in scored.tolist())
    return nats / tokens, nats / (math.log(2) * n_bytes)


def run_recipe(name: str, data: Path, out: Path, args, plain: bool):
    from dtl.train import TrainConfig, Trainer

    cfg = TrainConfig(
        data=str(data), out=str(out), preset="tiny", seq_len=args.seq_len,
        batch_size=args.batch_size, max_steps=args.steps, lr=args.lr,
        warmup_steps=0 if plain else args.warmup, decay_all=plain,
        weight_decay=0.1, log_every=max(1, args.steps // 5), eval_every=args.steps,
        save_every=args.steps, device="cpu", precision="fp32", progress=False, seed=0,
    )
    trainer = Trainer(cfg)
    started = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - started
    loss, bpb = val_loss_and_bpb(trainer.model, data, trainer.tokenizer, args.batch_size)
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"{name:6s} val loss {loss:.4f}  val ppl {math.exp(loss):8.2f}  bits/byte {bpb:.4f}  "
          f"({tokens:,} tokens, {seconds:.0f} s)", flush=True)
    return loss, bpb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100, help="dtl's warmup steps")
    parser.add_argument("--vocab-size", type=int, default=8192)
    # One thread: a tiny model gains little from two, and a shared machine stalls them.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", help="folder for the temporary data and runs (default: /tmp)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dtl.data.prepare import prepare
    from dtl.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        train_tokenizer([WIKITEXT], args.vocab_size, tmp / "tok", show_progress=False)
        summary = prepare([WIKITEXT], tmp / "data", tokenizer=str(tmp / "tok"), kind="wikitext",
                          max_length=args.seq_len, val_fraction=0.1, seed=0, progress=False)
        print(f"WikiText-2 test file by article: {summary['train']['documents']} train / "
              f"{summary['val']['documents']} val articles, {summary['train']['tokens']:,} / "
              f"{summary['val']['tokens']:,} tokens; tiny preset, lr {args.lr}, "
              f"B={args.batch_size} T={args.seq_len}, {args.steps} steps", flush=True)
        ours = run_recipe("dtl", tmp / "data", tmp / "dtl", args, plain=False)
        plain = run_recipe("plain", tmp / "data", tmp / "plain", args, plain=True)
    print(f"dtl - plain: val loss {ours[0] - plain[0]:+.4f} nats/token, "
          f"bits/byte {ours[1] - plain[1]:+.4f} (negative = dtl better)")


if __name__ == "__main__":
    main()
