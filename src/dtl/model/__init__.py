"""The model of the spec, box by box, and what it is saved as.

config.py       ModelConfig and the presets (tiny, small, medium, large, qa)
transformer.py  PositionalEncoding, MultiHeadAttention, FeedForward, TransformerBlock,
                TransformerLM: the spec's boxes in its order
head_loss.py    the vocabulary head and cross-entropy, fused and chunked
store.py        model dirs on disk: find one in a run dir, load it with its tokenizer
"""

from dtl.lazy import lazy_exports

# Imported on first use: `dtl.model.config` (no torch) must load without the torch modules.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "GPT2_VOCAB_SIZE": "dtl.model.config",
        "PRESETS": "dtl.model.config",
        "ModelConfig": "dtl.model.config",
        "IGNORE_INDEX": "dtl.model.head_loss",
        "linear_cross_entropy": "dtl.model.head_loss",
        "load_model": "dtl.model.store",
        "model_name": "dtl.model.store",
        "resolve_model_dir": "dtl.model.store",
        "FeedForward": "dtl.model.transformer",
        "KVCache": "dtl.model.transformer",
        "MultiHeadAttention": "dtl.model.transformer",
        "PositionalEncoding": "dtl.model.transformer",
        "TransformerBlock": "dtl.model.transformer",
        "TransformerLM": "dtl.model.transformer",
    },
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
