"""What a minute buys: `dtl train --max-time N` with the defaults, for the tiny and the small
preset, on this box (issue 23).

Data (as benchmarks/bench_quality.py prepares it): the shared WikiText-2 raw test file as one
text; a byte-level BPE (2,048 tokens) trained on its first 90%; prepared as one document in rows
of 128 tokens, so `dtl prepare` holds out its last 10% of tokens as the validation split. Each
preset trains for each N minutes on the training clock (evaluation and saving not counted),
with every other setting its default (batch 8, lr and warmup from the rules, --precision auto),
then is scored on every validation row.

Printed per run: the steps and tokens the budget bought, the tokens per second, and validation
bits per byte (loss in bits over the UTF-8 bytes of the scored tokens, independent of the
tokenizer); then one line per run: "N minutes on this box gives val bits/byte X, ...".

    python benchmarks/bench_minutes.py                       # 1 and 3 minutes, tiny and small
    python benchmarks/bench_minutes.py --minutes 10 --presets tiny
    python benchmarks/bench_minutes.py --minutes 0.05         # a smoke test (3 s each)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from shared_data import WIKITEXT

ROOT = Path(__file__).resolve().parents[1]


def prepare_data(tmp: Path, vocab_size: int, seq_len: int) -> Path:
    """The BPE (on the first 90% of the text) and the prepared dir (the last 10% for val)."""
    from dtl.data.prepare import prepare
    from dtl.tokenizer import train_tokenizer

    text = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n")
    (tmp / "head.txt").write_text(text[: int(0.9 * len(text))], encoding="utf-8")
    (tmp / "all.txt").write_text(text, encoding="utf-8")
    train_tokenizer([tmp / "head.txt"], vocab_size, tmp / "tok", show_progress=False)
    summary = prepare(
        [tmp / "all.txt"],
        tmp / "data",
        tokenizer=str(tmp / "tok"),
        kind="text",
        max_length=seq_len,
        val_fraction=0.1,
        seed=0,
        progress=False,
    )
    print(
        f"WikiText-2 test file: {summary['train']['tokens']:,} train / "
        f"{summary['val']['tokens']:,} val tokens, BPE {vocab_size}, rows of {seq_len}",
        flush=True,
    )
    return tmp / "data"


@torch.no_grad()
def val_bits_per_byte(model, data_dir: Path, tokenizer, batch_size: int, seq_len: int) -> float:
    """Bits per byte over every val row of `seq_len` tokens."""
    from dtl.data.loader import BatchLoader

    loader = BatchLoader(data_dir, "val", batch_size, shuffle=False, seq_len=seq_len)
    token_bytes = [len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)]
    model.eval()
    nats, n_bytes = 0.0, 0
    for _, batch in zip(range(loader.batches_per_epoch), loader, strict=False):
        logits = model(batch["input_ids"]).float()  # (B, T, V)
        targets = batch["targets"]  # (B, T), -100 where not scored
        nats += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        n_bytes += sum(token_bytes[i] for i in targets[targets != -100].tolist())
    return nats / (math.log(2) * n_bytes)


def run_one(preset: str, minutes: float, data: Path, out: Path, args) -> dict:
    """`dtl train --max-time minutes` of `preset` with the defaults; what it bought."""
    from dtl.train import TrainConfig, Trainer

    cfg = TrainConfig(
        data=str(data),
        out=str(out),
        preset=preset,
        seq_len=args.seq_len,
        max_time=minutes,
        eval_every=10**9,  # one evaluation, at the end (it is not on the clock either way)
        save_every=10**9,
        log_every=10**9,
        device=args.device,
        progress=False,
        seed=args.seed,
    )
    started = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.run()
    wall = time.perf_counter() - started
    bpb = val_bits_per_byte(trainer.model, data, trainer.tokenizer, cfg.batch_size, args.seq_len)
    result = {
        "preset": preset,
        "minutes": minutes,
        "steps": summary["step"],
        "tokens": summary["tokens"],
        "tokens_per_s": summary["tokens"] / summary["trained_s"],
        "bpb": bpb,
        "params": trainer.model.num_parameters(),
        "wall_s": wall,
    }
    print(
        f"{preset:6s} {minutes:g} min: {result['steps']:,} steps, {result['tokens']:,} tokens, "
        f"{result['tokens_per_s']:,.0f} tokens/s, val {bpb:.4f} bits/byte "
        f"({wall:.0f} s wall in all)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--work", help="folder for the temporary data and runs (default: /tmp)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        data = prepare_data(tmp, args.vocab_size, args.seq_len)
        for preset in args.presets:
            for minutes in args.minutes:
                out = tmp / f"{preset}-{minutes:g}"
                results.append(run_one(preset, minutes, data, out, args))
    threads = torch.get_num_threads()
    print("\n| preset | parameters | minutes | steps | tokens seen | tokens/s | val bits/byte |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['minutes']:g} | {r['steps']:,} | "
            f"{r['tokens']:,} | {r['tokens_per_s']:,.0f} | {r['bpb']:.4f} |"
        )
    print(f"\n({threads} torch threads)")
    for r in results:
        print(
            f"{r['minutes']:g} minutes on this box gives val bits/byte {r['bpb']:.3f}, tokens "
            f"seen {r['tokens']:,}, steps {r['steps']:,} ({r['preset']})"
        )


if __name__ == "__main__":
    main()
