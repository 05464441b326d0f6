"""The model of the spec, box by box, and what it is saved as.

config.py       ModelConfig and the presets (tiny, small, medium, large, qa)
transformer.py  PositionalEncoding, MultiHeadAttention, FeedForward, TransformerBlock,
                TransformerLM: the spec's boxes in its order
head_loss.py    the vocabulary head and cross-entropy, fused and chunked
store.py        model dirs on disk: find one in a run dir, load it with its tokenizer
"""

from dtl.model.config import GPT2_VOCAB_SIZE, PRESETS, ModelConfig
from dtl.model.head_loss import IGNORE_INDEX, linear_cross_entropy
from dtl.model.store import load_model, model_name, resolve_model_dir
from dtl.model.transformer import (
    FeedForward,
    KVCache,
    MultiHeadAttention,
    PositionalEncoding,
    TransformerBlock,
    TransformerLM,
)

__all__ = [
    "GPT2_VOCAB_SIZE",
    "IGNORE_INDEX",
    "PRESETS",
    "FeedForward",
    "KVCache",
    "ModelConfig",
    "MultiHeadAttention",
    "PositionalEncoding",
    "TransformerBlock",
    "TransformerLM",
    "linear_cross_entropy",
    "load_model",
    "model_name",
    "resolve_model_dir",
]
