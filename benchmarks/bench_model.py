"""Training-step throughput of TransformerLM beside Hugging Face's GPT2LMHeadModel.

One step = forward, cross-entropy, backward, AdamW step, in fp32. Both models get the same
d_model / n_heads / n_layers / d_ff / vocab, random weights, the same batch, the same optimizer
settings and the same dropout, and are timed alternately in the same run so machine noise hits
both alike.

    python benchmarks/bench_model.py                      # small preset, B=8, T=256
    python benchmarks/bench_model.py --preset tiny --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peers import gpt2_peer

from dtl import ModelConfig, TransformerLM


def make_peer(cfg: ModelConfig) -> torch.nn.Module:
    return gpt2_peer(cfg)


def dtl_step(model, opt, x, y):
    loss = model.loss(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def peer_step(model, opt, x, y):
    loss = model(input_ids=x, labels=y).loss  # HF shifts labels inside; same token count
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def time_steps(step, model, opt, x, y, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step(model, opt, x, y)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=50_257)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ModelConfig.preset(args.preset, vocab_size=args.vocab_size, dropout=args.dropout)
    B, T = args.batch_size, args.seq_len
    data = torch.randint(0, cfg.vocab_size, (B, T + 1))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    ours = TransformerLM(cfg).train()
    peer = make_peer(cfg).train()
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=True)
    # HF's labels are the inputs (it shifts inside): give it T+1 tokens so both score T.
    peer_x = data

    print(
        f"preset={args.preset} B={B} T={T} vocab={cfg.vocab_size} threads={torch.get_num_threads()} "
        f"torch={torch.__version__}"
    )
    print(
        f"params: dtl={sum(p.numel() for p in ours.parameters()):,} "
        f"hf_gpt2={sum(p.numel() for p in peer.parameters()):,} (GPT-2 ties head and embedding)"
    )
    # Warm-up: allocator, kernels, optimizer state.
    time_steps(dtl_step, ours, ours_opt, x, y, 1)
    time_steps(peer_step, peer, peer_opt, peer_x, peer_x, 1)
    ours_t, peer_t = [], []
    for _ in range(args.rounds):  # alternate so drifting machine load hits both
        ours_t += time_steps(dtl_step, ours, ours_opt, x, y, args.steps)
        peer_t += time_steps(peer_step, peer, peer_opt, peer_x, peer_x, args.steps)
    tokens = B * T
    ours_tps = tokens / statistics.median(ours_t)
    peer_tps = tokens / statistics.median(peer_t)
    print(
        f"dtl TransformerLM   : {ours_tps:9.0f} tokens/s  (median step {statistics.median(ours_t):.3f}s)"
    )
    print(
        f"hf GPT2LMHeadModel  : {peer_tps:9.0f} tokens/s  (median step {statistics.median(peer_t):.3f}s)"
    )
    print(f"ratio dtl / hf      : {ours_tps / peer_tps:.2f}x")


if __name__ == "__main__":
    main()
