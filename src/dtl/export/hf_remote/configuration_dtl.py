"""The configuration of a DTL model in transformers (written by `dtl export --format hf`).

This file travels with the exported folder and imports transformers only, never dtl.

>>> from transformers import AutoConfig
>>> AutoConfig.from_pretrained("my-export", trust_remote_code=True).d_model
32
"""

from transformers import PretrainedConfig


class DtlConfig(PretrainedConfig):
    """The sizes of DTL's TransformerLM, under its own names (and transformers' usual ones)."""

    model_type = "dtl"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_length",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        d_model: int = 256,
        n_heads: int = 8,
        n_layers: int = 6,
        d_ff: int = 1024,
        max_seq_length: int = 512,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        trained_seq_len: int | None = None,
        use_cache: bool = True,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.d_ff = d_ff
        self.max_seq_length = max_seq_length
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.trained_seq_len = trained_seq_len  # the context the weights were trained at
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", False)  # the head is its own matrix, with bias
        super().__init__(
            eos_token_id=eos_token_id,
            bos_token_id=bos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
