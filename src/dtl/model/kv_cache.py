"""The KV cache: keys and values of the tokens seen so far, for incremental decoding.

>>> cache = KVCache.allocate(ModelConfig.preset("tiny", vocab_size=100), batch_size=1)
>>> cache.max_len, cache.length
(256, 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dtl.model.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    `keys[i]` / `values[i]`: (B, n_heads, max_len, d_k), filled up to `length`.
    `key_mask`: (B, max_len) bool, False where a cached position is padding.

    A server's rows join and leave a running cache: `dtl.generate.batch` selects and merges
    rows of caches.
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor
    length: int = 0
    has_padding: bool = False

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        max_len = config.max_seq_length if max_len is None else min(max_len, config.max_seq_length)
        shape = (batch_size, config.n_heads, max_len, config.d_k)
        return cls(
            keys=[torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
            values=[torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)],
            key_mask=torch.ones(batch_size, max_len, device=device, dtype=torch.bool),
        )

    @property
    def batch_size(self) -> int:
        return self.key_mask.size(0)

    @property
    def max_len(self) -> int:
        return self.key_mask.size(1)
