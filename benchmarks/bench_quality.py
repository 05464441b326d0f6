"""Quality for a fixed token budget on two workloads: DTL's recipes and a nanoGPT-style
reference, on the same model, tokenizer, split and token budget, two seeds each, in one run.

Workloads (`--workload single|repeat|both`), each a text prepared as one document: a byte-level
BPE (2,048 tokens) trained on its first 90%, `dtl prepare` holding out its last 10% of tokens
as the validation split (no token in both):
  repeat  the shared WikiText-2 raw test file (369,592 train tokens): 1,562 steps read it ~4.3
          times. With fewer --steps the text is cut to the same share of it, so a short run
          repeats its data as often (300 steps: the first 19%, ~4.3 passes).
  single  the enwiki sample's articles (`dtl extract`) after the WikiText-2 test file (~1.15M
          train tokens): read at most 0.95 times (--steps is capped to that, and printed).
Model (issue 14's budget): d_model 128, 4 heads, 4 layers, d_ff 512, dropout 0 (nanoGPT's
pretraining default), T=128, batch 8, 1,562 steps (1.6M tokens), fp32.

Recipes (every one sees `steps * batch * T` training tokens; `--recipes`, and `--define
NAME=key=value,...` for one of your own over `dtl train`'s settings):
  dtl-default   `dtl train` with no recipe flags: whatever the defaults are (at --precision)
  dtl-auto      `dtl train` with no flags at all: the defaults and --precision auto (bf16 on a
                CPU with native bf16), what a user gets
  dtl-adamw     --optimizer adamw (the defaults before issue 23)  dtl-muon  --optimizer muon
  dtl-rows / dtl-offsets   --data-order rows / offsets
  dtl-muon-14   Muon as issue 14 measured it: no momentum warmup, rows, cosine
  dtl-ref-hp    `dtl train` with the reference's lr and warmup
  nanogpt       a plain loop written here: random windows of the train tokens, torch's AdamW
                (lr 1e-3, betas 0.9/0.95, weight decay 0.1 on matrices), 5% warmup, cosine to
                10%, clip 1.0
Printed: validation bits per byte (loss in bits over the UTF-8 bytes of the scored tokens,
independent of the tokenizer) over every validation row of T tokens, per workload, recipe and
seed, the mean, the difference to nanogpt, and each run's steps per second (noisy when runs
share the machine: `--speed` times the recipes' steps interleaved in one process).

`--max-time-half` (needs TrainConfig.max_time, `dtl train --max-time`): per workload and seed,
time the reference over the full budget (its training time T, evaluations excluded), then run
`dtl train` with its defaults for T/2 (max_time = T/2 minutes) and say whether DTL at T/2 is
at least as good as the reference at T; the curves (bits per byte against training minutes)
go to docs/img/quality-curve.csv and .png.

    python benchmarks/bench_quality.py --jobs 2                        # full budget, both
    python benchmarks/bench_quality.py --steps 300 --workload repeat   # a quick look
    python benchmarks/bench_quality.py --speed --recipes dtl-default dtl-adamw dtl-muon
    python benchmarks/bench_quality.py --speed --recipes nanogpt dtl-auto   # per minute vs ref
    python benchmarks/bench_quality.py --max-time-half                 # the issue-23 goal
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from shared_data import ENWIKI, WIKITEXT

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
MODEL = {"d_model": 128, "n_heads": 4, "n_layers": 4, "d_ff": 512}
FULL_STEPS = 1562  # 1.6M tokens at batch 8 x 128: the repeat workload's ~4.3 passes
SINGLE_PASS_SHARE = 0.95  # the single workload reads at most this share of its train tokens
WORKLOADS = ("single", "repeat")
# Named recipes: settings over `dtl train`'s defaults (None: the reference loop).
RECIPES: dict[str, dict | None] = {
    "dtl-default": {},
    "dtl-auto": {"precision": "auto"},  # no flags at all: --precision auto as well
    "dtl-adamw": {"optimizer": "adamw"},
    "dtl-muon": {"optimizer": "muon"},
    "dtl-rows": {"data_order": "rows"},
    "dtl-offsets": {"data_order": "offsets"},
    "dtl-muon-14": {"optimizer": "muon", "muon_momentum_warmup": 0, "data_order": "rows"},
    "dtl-ref-hp": {},  # lr and warmup filled in from --ref-lr and --steps
    "nanogpt": None,
}
DEFAULT_RECIPES = ["dtl-default", "dtl-adamw", "dtl-muon", "nanogpt"]


@dataclasses.dataclass
class Workload:
    name: str
    data: Path  # the prepared dir (its tokenizer inside)
    train_ids: torch.Tensor  # the train split's tokens, for the reference's random windows
    steps: int


# ---------------------------------------------------------------------- evaluation
def val_token_bytes(data_dir: Path, tokenizer, batch_size: int, seq_len: int) -> tuple[int, int]:
    """(scored tokens, their UTF-8 bytes) over every val row of `seq_len` tokens."""
    from dtl.data.loader import BatchLoader

    loader = BatchLoader(data_dir, "val", batch_size, shuffle=False, seq_len=seq_len)
    token_bytes = [len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)]
    n_tokens = n_bytes = 0
    for _, batch in zip(range(loader.batches_per_epoch), loader, strict=False):
        scored = batch["targets"][batch["targets"] != -100].tolist()
        n_tokens += len(scored)
        n_bytes += sum(token_bytes[i] for i in scored)
    return n_tokens, n_bytes


@torch.no_grad()
def val_bits_per_byte(model, data_dir: Path, tokenizer, batch_size: int, seq_len: int) -> float:
    """Bits per byte over every val row of `seq_len` tokens."""
    from dtl.data.loader import BatchLoader

    loader = BatchLoader(data_dir, "val", batch_size, shuffle=False, seq_len=seq_len)
    was_training = model.training
    model.eval()
    nats = 0.0
    for _, batch in zip(range(loader.batches_per_epoch), loader, strict=False):
        logits = model(batch["input_ids"])  # (B, T, V)
        targets = batch["targets"]  # (B, T), -100 where not scored
        nats += F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
        ).item()
    model.train(was_training)
    _, n_bytes = val_token_bytes(data_dir, tokenizer, batch_size, seq_len)
    return nats / (math.log(2) * n_bytes)


# ---------------------------------------------------------------------- the runs
def recipe_settings(recipe: str, args) -> dict:
    """The `dtl train` settings a named (or --define'd) recipe changes."""
    if recipe == "dtl-ref-hp":
        return {"lr": args.ref_lr, "warmup_steps": round(0.05 * args.steps)}
    return dict(args.recipe_table[recipe])


def dtl_config(recipe: str, work: Workload, out: Path, args, seed: int, **over):
    """The TrainConfig of one recipe's run on `work`."""
    from dtl.train import TrainConfig

    steps = over.pop("max_steps", work.steps)  # None: bounded by max_time alone
    nominal = steps or work.steps  # the intervals below
    settings = {
        "data": str(work.data),
        "out": str(out),
        "preset": "tiny",
        **MODEL,
        "dropout": args.dropout,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "log_every": max(1, nominal // 4),
        "eval_every": nominal,
        "save_every": nominal,
        "device": "cpu",
        "precision": args.precision,
        "progress": False,
        "seed": seed,
        **recipe_settings(recipe, args),
        **over,
    }
    if steps is not None:
        settings["max_steps"] = steps
    return TrainConfig.from_dict(settings, source=f"recipe {recipe}")


def run_dtl(recipe: str, work: Workload, out: Path, args, seed: int):
    """One `dtl train` run; returns (model, tokenizer, training seconds, first log line)."""
    from dtl.train import Trainer

    trainer = Trainer(dtl_config(recipe, work, out, args, seed))
    first = trainer.resolved.first_line(trainer.model.num_parameters())
    started = time.perf_counter()
    trainer.run()
    return trainer.model, trainer.tokenizer, time.perf_counter() - started, first


def lr_nanogpt(step: int, steps: int, peak: float) -> float:
    """The reference's lr: 5% linear warmup, cosine to peak / 10."""
    warmup, lr_min = max(1, round(0.05 * steps)), peak / 10
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr_min + 0.5 * (peak - lr_min) * (1 + math.cos(math.pi * progress))


def nanogpt_step(work: Workload, args, seed: int):
    """The reference: nanoGPT's loop on random windows, written independently of dtl.train.
    Returns (model, tokenizer, step): `step(i)` trains its optimizer step i (0-based)."""
    from dtl import ModelConfig, TransformerLM
    from dtl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(work.data))
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
    T, B, steps, ids = args.seq_len, args.batch_size, work.steps, work.train_ids
    gen = torch.Generator().manual_seed(seed)
    model.train()

    def train_step(step: int) -> None:
        for group in opt.param_groups:
            group["lr"] = lr_nanogpt(step, steps, args.ref_lr)
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        x = torch.stack([ids[s : s + T] for s in starts])  # (B, T)
        y = torch.stack([ids[s + 1 : s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return model, tokenizer, train_step


def run_nanogpt(work: Workload, args, seed: int, curve_points: int = 0):
    """The reference (`nanogpt_step`) over the budget. Returns (model, tokenizer, training
    seconds, curve): with `curve_points`, the val bits per byte at that many evenly spaced
    steps, against training minutes (evaluation excluded)."""
    model, tokenizer, train_step = nanogpt_step(work, args, seed)
    steps, T, B = work.steps, args.seq_len, args.batch_size
    at = (
        {round(steps * (k + 1) / curve_points) for k in range(curve_points)} if curve_points else ()
    )
    curve, trained = [], 0.0
    for step in range(steps):
        started = time.perf_counter()
        train_step(step)
        trained += time.perf_counter() - started
        if step + 1 in at:
            bpb = val_bits_per_byte(model, work.data, tokenizer, B, T)
            curve.append((trained / 60, bpb))
    return model, tokenizer, trained, curve


def run_one(job: tuple) -> tuple[str, str, int, float, float, int]:
    """One recipe with one seed on one workload: (workload, recipe, seed, val bits per byte,
    training seconds, steps)."""
    recipe, seed, work, tmp, args = job
    torch.set_num_threads(args.threads)
    if recipe == "nanogpt":
        model, tok, took, _ = run_nanogpt(work, args, seed)
    else:
        model, tok, took, first = run_dtl(
            recipe, work, tmp / f"{work.name}-{recipe}-{seed}", args, seed
        )
        if seed == args.seeds[0]:
            print(f"{work.name} {recipe}: {first}", flush=True)
    bpb = val_bits_per_byte(model, work.data, tok, args.batch_size, args.seq_len)
    print(
        f"{work.name:6s} {recipe:14s} seed {seed}: {bpb:.4f} bits/byte "
        f"({took:.0f} s, {work.steps / took:.2f} steps/s)",
        flush=True,
    )
    return work.name, recipe, seed, bpb, took, work.steps


# ---------------------------------------------------------------------- the data
def workload_text(name: str, tmp: Path, steps: int) -> str:
    """The text of a workload (see the module docs)."""
    wikitext = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n")
    if name == "repeat":  # the same share of the file as of the full budget: same passes
        return wikitext[: int(len(wikitext) * min(1.0, steps / FULL_STEPS))]
    from dtl.data.extract import extract

    records = tmp / "enwiki.jsonl"
    if not records.is_file():
        extract(ENWIKI, records, progress=False)
    articles = [json.loads(line)["text"] for line in records.read_text().splitlines()]
    return wikitext + "\n\n" + "\n\n".join(articles)


def prepare_workload(name: str, tmp: Path, args) -> Workload:
    """The tokenizer (on the first 90% of the text), the prepared dir, the train token ids."""
    from dtl.data.prepare import prepare
    from dtl.tokenizer import train_tokenizer

    folder = tmp / name
    folder.mkdir()
    text = workload_text(name, tmp, args.steps)
    cut = int(0.9 * len(text))
    (folder / "head.txt").write_text(text[:cut], encoding="utf-8")
    (folder / "all.txt").write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer(
        [folder / "head.txt"], args.vocab_size, folder / "tok", show_progress=False
    )
    # One document: prepare splits its tokens, the last 10% to val.
    summary = prepare(
        [folder / "all.txt"],
        folder / "data",
        tokenizer=str(folder / "tok"),
        kind="text",
        max_length=args.seq_len,
        val_fraction=0.1,
        seed=0,
        progress=False,
    )
    n_train = summary["train"]["tokens"]
    steps, per_step = args.steps, args.batch_size * args.seq_len
    if name == "single":
        steps = min(steps, int(SINGLE_PASS_SHARE * (n_train // args.seq_len) / args.batch_size))
    print(
        f"{name}: {n_train:,} train / {summary['val']['tokens']:,} val tokens, BPE "
        f"{args.vocab_size}; model {MODEL}, dropout {args.dropout}, B={args.batch_size} "
        f"T={args.seq_len}, {steps} steps = {steps * per_step:,} tokens per run "
        f"({steps * per_step / n_train:.2f} passes)",
        flush=True,
    )
    ids = tokenizer.encode(text)
    train_ids = torch.tensor(ids[: int(0.9 * len(ids))], dtype=torch.long)
    return Workload(name, folder / "data", train_ids, steps)


# ---------------------------------------------------------------------- --speed
def speed(work: Workload, tmp: Path, args) -> None:
    """Each recipe's optimizer step timed in turns in this process (A, B, A, B, ...), the
    best of `--speed-rounds` rounds of `--speed-steps` steps: steps/s, tokens/s and the ratio
    to the first recipe (`nanogpt` first: against the fp32 AdamW reference)."""
    from dtl.train import Trainer

    steps = {}  # recipe -> a function that trains one step
    for recipe in args.recipes:
        if recipe == "nanogpt":
            _, _, train_step = nanogpt_step(work, args, args.seeds[0])
            counter = iter(range(10**9))
            steps[recipe] = lambda f=train_step, c=counter: f(next(c))
        else:
            cfg = dtl_config(recipe, work, tmp / f"speed-{recipe}", args, args.seeds[0])
            trainer = Trainer(cfg)
            print(f"{recipe}: {trainer.resolved.first_line(trainer.model.num_parameters())}")
            steps[recipe] = lambda t=trainer: t.train_step([next(t.train_loader)])
        for _ in range(2):  # warm up: first calls allocate
            steps[recipe]()
    best = dict.fromkeys(steps, math.inf)
    for _ in range(args.speed_rounds):
        for recipe, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.speed_steps):
                step()
            best[recipe] = min(best[recipe], (time.perf_counter() - started) / args.speed_steps)
    first = args.recipes[0]
    tokens = args.batch_size * args.seq_len
    print(f"\nsteps/s, interleaved, best of {args.speed_rounds} x {args.speed_steps} steps")
    for recipe in steps:
        print(
            f"{recipe:14s} {1 / best[recipe]:7.2f} steps/s  {tokens / best[recipe]:8,.0f} "
            f"tokens/s  {best[first] / best[recipe]:.3f}x {first}"
        )


# ---------------------------------------------------------------------- --max-time-half
def eval_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training minutes, val loss) at each evaluation of a run, from its metrics.jsonl
    (`trained_s`: the training clock, evaluating and saving left out)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["trained_s"] / 60, r["val_loss"]) for r in records if "val_loss" in r]


def max_time_half(workloads: list[Workload], tmp: Path, args) -> None:
    """The issue-23 goal, run by run (never two at once: the times are the point)."""
    from dtl.train import TrainConfig, Trainer

    if "max_time" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        sys.exit(
            "--max-time-half needs TrainConfig.max_time (`dtl train --max-time`), which this "
            "checkout lacks: run it on a branch that has it"
        )
    rows, met = [], []
    for work in workloads:
        for seed in args.seeds:
            model, tok, ref_s, ref_curve = run_nanogpt(work, args, seed, curve_points=6)
            ref = val_bits_per_byte(model, work.data, tok, args.batch_size, args.seq_len)
            n_tokens, n_bytes = val_token_bytes(work.data, tok, args.batch_size, args.seq_len)
            to_bpb = n_tokens / (math.log(2) * n_bytes)  # val loss (nats/token) -> bits/byte
            minutes = ref_s / 2 / 60
            # eval_batches covers every val row, so the run's val loss is the benchmark's
            val_batches = max(1, n_tokens // (args.batch_size * args.seq_len) + 1)
            cfg = dtl_config(
                "dtl-default",
                work,
                tmp / f"half-{work.name}-{seed}",
                args,
                seed,
                max_time=minutes,
                precision="auto",  # the defaults: bf16 on a CPU with native bf16, else fp32
                max_steps=None,  # the clock ends the run, as `dtl train --max-time` alone
                eval_every=max(1, work.steps // 6),
                log_every=max(1, work.steps // 20),
                eval_batches=val_batches,
            )
            trainer = Trainer(cfg)
            started = time.perf_counter()
            trainer.run()
            dtl_s = time.perf_counter() - started
            dtl = val_bits_per_byte(trainer.model, work.data, tok, args.batch_size, args.seq_len)
            ok = dtl <= ref
            met.append(ok)
            print(
                f"{work.name} seed {seed}: reference {ref:.4f} bits/byte in T = {ref_s / 60:.2f} "
                f"min; dtl defaults {dtl:.4f} in {dtl_s / 60:.2f} min (max_time {minutes:.2f}, "
                f"{trainer.state.step} steps): {'met' if ok else 'NOT met'}",
                flush=True,
            )
            rows += [(work.name, "nanogpt", seed, m, b) for m, b in [(0.0, None), *ref_curve]]
            rows += [
                (work.name, "dtl-default", seed, m, loss * to_bpb)
                for m, loss in eval_curve(trainer.run_dir)
            ]
    print(
        f"goal (dtl at T/2 <= reference at T): {'met' if all(met) else 'NOT met'} in "
        f"{sum(met)} of {len(met)} runs"
    )
    write_curve([r for r in rows if r[4] is not None], args)


def write_curve(rows: list[tuple], args) -> None:
    """docs/img/quality-curve.csv, and .png where matplotlib is installed."""
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / "quality-curve.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["workload", "recipe", "seed", "minutes", "bits_per_byte"])
        writer.writerows([(w, r, s, f"{m:.4f}", f"{b:.4f}") for w, r, s, m, b in rows])
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the CSV has the curves)")
        return
    names = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for recipe, seed in sorted({(r[1], r[2]) for r in rows if r[0] == name}):
            points = [(m, b) for w, r, s, m, b in rows if (w, r, s) == (name, recipe, seed)]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{recipe} seed {seed}")
        ax.set(title=f"{name} workload", xlabel="training minutes", ylabel="val bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = IMG / "quality-curve.png"
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


# ---------------------------------------------------------------------- main
def parse_define(text: str) -> tuple[str, dict]:
    """--define NAME=key=value,key=value -> (NAME, {key: value})."""
    name, _, rest = text.partition("=")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--define {text}: expected NAME=key=value,key=value")
        settings[key.strip().replace("-", "_")] = value.strip()
    return name, settings


def summarise(results: list[tuple], args) -> None:
    by: dict[tuple[str, str], list[tuple]] = {}
    for work, recipe, _seed, bpb, took, steps in results:
        by.setdefault((work, recipe), []).append((bpb, steps / took))
    for work in dict.fromkeys(w for w, *_ in results):
        print(
            f"\n{work}: recipe        "
            + "  ".join(f"seed {s}" for s in args.seeds)
            + "    mean   vs nanogpt  steps/s vs default (noisy)"
        )
        ref = by.get((work, "nanogpt"))
        base = by.get((work, "dtl-default"))
        for (w, recipe), values in by.items():
            if w != work:
                continue
            mean = statistics.mean(v for v, _ in values)
            cells = "  ".join(f"{v:.4f}" for v, _ in values)
            vs = f"{mean - statistics.mean(v for v, _ in ref):+.4f}" if ref else "-"
            speed_ratio = "-"
            if base:
                speed_ratio = f"{statistics.mean(s for _, s in values) / statistics.mean(s for _, s in base):.2f}x"
            print(f"  {recipe:20s}  {cells}  {mean:.4f}  {vs:>9s}  {speed_ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=FULL_STEPS)
    parser.add_argument("--workload", choices=(*WORKLOADS, "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", default="fp32", help="DTL's runs (the reference: fp32)")
    parser.add_argument("--ref-lr", type=float, default=1e-3, help="the reference's lr")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME=key=value,...",
        help="a recipe of your own: `dtl train` settings, e.g. wsd=schedule=wsd,min_lr=0",
    )
    # One thread: a tiny model gains little from two, and a shared machine stalls them.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    parser.add_argument("--speed", action="store_true", help="time the recipes' steps in turns")
    parser.add_argument("--speed-steps", type=int, default=10)
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--max-time-half", action="store_true", help="the issue-23 goal")
    parser.add_argument("--work", help="folder for the temporary data and runs (default: /tmp)")
    args = parser.parse_args()
    args.recipe_table = dict(RECIPES)
    args.recipe_table.update(parse_define(d) for d in args.define)
    unknown = [r for r in args.recipes if r not in args.recipe_table]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; named: {sorted(args.recipe_table)}")
    torch.set_num_threads(args.threads)
    names = WORKLOADS if args.workload == "both" else (args.workload,)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        workloads = [prepare_workload(name, tmp, args) for name in names]
        if args.speed:
            return speed(workloads[-1], tmp, args)
        if args.max_time_half:
            return max_time_half(workloads, tmp, args)
        jobs = [(r, s, w, tmp, args) for w in workloads for r in args.recipes for s in args.seeds]
        # Runs are independent (own seed, own run dir): --jobs N runs N at once, in processes.
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:
            results = list(pool.map(run_one, jobs))
    summarise(results, args)


if __name__ == "__main__":
    main()
