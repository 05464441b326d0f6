"""The peer the benchmarks measure DTL against: Hugging Face's GPT-2 of the same sizes.

    from peers import gpt2_peer
    hf = gpt2_peer(ModelConfig.preset("small")).eval()

GPT-2 differs from the spec's model in its block order (pre-LN) and has no head bias, but
its parameter count and FLOPs per token match DTL's within a few percent at equal sizes.
"""

from __future__ import annotations

from dtl import ModelConfig


def gpt2_peer(config: ModelConfig):
    """A randomly initialised `GPT2LMHeadModel` with `config`'s sizes and dropout (none on
    the attention weights: DTL has none there either)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.max_seq_length,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=config.d_ff,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=0.0,
        )
    )
