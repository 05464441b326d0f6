"""Measure the peak memory of real training steps, in a fresh process (run by test_memory).

    python tests/train/memory_probe.py PRESET VOCAB BATCH SEQ CHECKPOINTING GRAD_ACCUM

Prints {"measured": bytes}: the process's peak RSS during two optimizer steps minus its RSS
just before the model was built. A warm-up step on a throwaway model first faults in the code
pages and thread pools every step touches, so the difference is the step's own memory. Run
with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS instead of staying in
the allocator's heap, where a later tensor would reuse them unseen.
"""

import gc
import json
import resource
import sys

import torch

from dtl import ModelConfig, TransformerLM
from dtl.train import enable_activation_checkpointing
from dtl.train.memory import peak_rss_bytes


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    preset, vocab, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    checkpointing, accum = sys.argv[5] == "1", int(sys.argv[6])
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq))
    y = torch.randint(0, vocab, (batch, seq))

    warm = TransformerLM(ModelConfig.preset("tiny", vocab_size=100, max_seq_length=seq))
    if checkpointing:
        enable_activation_checkpointing(warm)
    opt = torch.optim.AdamW(warm.parameters(), fused=True)
    warm.loss(x % 100, y % 100).backward()
    opt.step()
    del warm, opt
    gc.collect()

    base = current_rss()
    model = TransformerLM(ModelConfig.preset(preset, vocab_size=vocab)).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for _ in range(2):
        for _ in range(accum):
            (model.loss(x, y) / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = peak_rss_bytes()
    print(json.dumps({"measured": peak - base, "base": base, "peak": peak}))


if __name__ == "__main__":
    main()
