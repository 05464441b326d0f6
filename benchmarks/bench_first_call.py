"""Decode speed on the first call in a fresh process, and on later calls, against Hugging
Face's GPT-2 `generate` measured the same way in the same run.

`dtl generate` (the CLI) and a library user's first `generate_tokens` call meet the cold
figure: everything the first call does (laying out the CPU decode plan, the first touches of
the KV cache and the thread pool) counts. Each decoder runs in its own fresh process, in turn,
`--rounds` times; a round's figures are the first call and the median of the `--later` calls
after it. Same workload as `bench_generate.py`: the `small` preset with random weights
(vocab 50,257), batch 1, a 16-token prompt, 128 new tokens, top-k 50, fp32, 2 threads.

    python benchmarks/bench_first_call.py              # 3 rounds (about a minute on 2 cores)
    python benchmarks/bench_first_call.py --rounds 5 --later 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import torch
threads, decoder, later = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
from dtl import ModelConfig, TransformerLM
PROMPT, NEW, TOP_K = 16, 128, 50
torch.manual_seed(0)
config = ModelConfig.preset("small")
ids = torch.randint(0, config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
if decoder == "dtl":
    from dtl.generate import generate_tokens
    model = TransformerLM(config).eval()
    def call():
        generate_tokens(model, ids, NEW, top_k=TOP_K, seed=0)
else:
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_seq_length, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.d_ff)).eval()
    def call():
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=TOP_K,
                           max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
times = []
for _ in range(1 + later):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
print(json.dumps({"first": NEW / times[0], "later": [NEW / s for s in times[1:]]}))
"""

DECODERS = (("dtl", "dtl generate_tokens"), ("hf", "HF GPT2LMHeadModel.generate"))


def run_worker(decoder: str, threads: int, later: int) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, str(threads), decoder, str(later)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--later", type=int, default=4, help="calls after the first, per round")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    rounds: dict[str, list[dict]] = {name: [] for name, _ in DECODERS}
    for r in range(args.rounds):
        for name, _ in DECODERS:  # interleaved, so both see the same machine
            fig = run_worker(name, args.threads, args.later)
            rounds[name].append(fig)
            print(f"round {r + 1}: {name:<4} first call {fig['first']:6.1f} tok/s, later calls "
                  f"{statistics.median(fig['later']):6.1f} tok/s (median of {args.later})")  # fmt: skip
    summary = {}
    for name, _label in DECODERS:
        summary[name] = {
            "first": statistics.median(f["first"] for f in rounds[name]),
            "later": statistics.median(x for f in rounds[name] for x in f["later"]),
        }
    hf = summary["hf"]
    print(f"\nmedians over {args.rounds} fresh processes per decoder ({args.threads} threads):")
    for name, label in DECODERS:
        s = summary[name]
        print(f"  {label:<28} first call {s['first']:6.1f} tok/s ({s['first'] / hf['first']:.2f}x "
              f"HF's first), later calls {s['later']:6.1f} tok/s "
              f"({s['later'] / hf['later']:.2f}x HF's later)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": rounds, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
