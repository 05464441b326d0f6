"""What the export tests share: a corpus, the texts tokenizers must agree on, a tiny model.
(Imported by name: conftest.py files cannot be, as several share the name.)"""

from __future__ import annotations

import torch

from dtl import ModelConfig, TransformerLM

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock; don't panic!\n"
    "Les élèves étudient à l'école. Ünïcode ✓ and emoji 🙂 too.\n"
    "    indented line\twith a tab\n\n"
) * 40
# Text the tokenizers must agree on: spaces, tabs, newlines, digits, contractions, non-ASCII.
SAMPLES = [
    "Hello world",
    "The quick brown fox, it's 2024 and we'll see.",
    "  two leading spaces\n\nthen   three inside\t tab",
    "élève ✓ 🙂 日本語",
    "trailing spaces   ",
    "<|endoftext|> inside text",
]


def tiny_model(vocab_size: int, seed: int = 0) -> TransformerLM:
    """A small model whose every weight is random (biases and LayerNorms too, unlike a fresh
    init), so a mistake in any of them changes the logits."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                         max_seq_length=64, trained_seq_len=48)  # fmt: skip
    model = TransformerLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()
