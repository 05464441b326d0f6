"""The KV cache: keys and values of the tokens seen so far, for incremental decoding.

Only its own methods change it, in the order a forward through it runs:

    key_valid = cache.write_mask(attention_mask, T)   # which new slots are real tokens
    k, v = cache.append(layer, k, v)                   # each layer: store, attend to all
    cache.advance(T)                                   # the T tokens are now cached

and, between steps of a running batch, `keep_rows` (requests leave) and `KVCache.merge`
(requests join) make new caches from old ones.

>>> cache = KVCache.allocate(ModelConfig.preset("tiny", vocab_size=100), batch_size=1)
>>> cache.max_len, cache.length
(256, 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dtl.model.config import ModelConfig


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer, for incremental decoding.

    `keys[i]` / `values[i]`: (B, n_heads, max_len, d_k), filled up to `length`.
    `key_mask`: (B, max_len) bool, False where a cached position is padding.
    `has_padding`: whether any cached position is padding (else attention takes the plain
    causal fast paths).

    Read the fields freely; change them only through the methods below.
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

    # ------------------------------------------------------------------ one forward through it
    def write_mask(self, new_mask: Tensor | None, n_new: int) -> Tensor | None:
        """Record which of the `n_new` slots after `length` hold real tokens (new_mask (B, n_new)
        bool, or None: all of them). Returns which of all keys so far are real tokens,
        (B, length + n_new) bool, or None when none ever was padding (the fast paths)."""
        end = self.length + n_new
        slots = self.key_mask.narrow(1, self.length, n_new)  # (B, n_new); narrow and fill_,
        if new_mask is None:  # not `[:, a:b] = ...`: a decode step counts its dispatcher calls
            slots.fill_(True)
        else:
            slots.copy_(new_mask)
        if new_mask is not None and not self.has_padding:
            self.has_padding = bool((~new_mask).any())
        return self.key_mask.narrow(1, 0, end) if self.has_padding else None

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer `layer`'s new keys and values (B, H, T, d_k) after the `length` cached
        ones; returns all of that layer's keys and values, (B, H, length + T, d_k) each.
        `length` moves on once every layer has appended (`advance`)."""
        keys, values, n = self.keys[layer], self.values[layer], k.size(2)
        keys.narrow(2, self.length, n).copy_(k)  # written in place: no cat, no new tensor
        values.narrow(2, self.length, n).copy_(v)
        end = self.length + n
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """`n` more tokens are cached (after their `write_mask` and every layer's `append`)."""
        self.length += n

    # ------------------------------------------------------------------ rows leaving and joining
    def keep_rows(self, rows: Sequence[int] | Tensor) -> KVCache:
        """A new cache of `rows` (row indices, in order) only, less the leading slots that none
        of them uses (so a long-gone row's length is not carried on)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.key_mask.device)
        used = self.key_mask[rows, : self.length]  # (b, length)
        first = int(used.any(0).long().argmax()) if bool(used.any()) else self.length
        return KVCache(
            keys=[k[rows, :, first:] for k in self.keys],
            values=[v[rows, :, first:] for v in self.values],
            key_mask=self.key_mask[rows, first:],
            length=self.length - first,
            has_padding=bool((~used[:, first:]).any()),
        )

    @classmethod
    def merge(cls, caches: Sequence[KVCache], room: int) -> KVCache:
        """One new cache holding the rows of `caches` in order, each right-aligned at the
        longest length (shorter ones left-padded with masked slots: positions count real
        tokens, so this changes nothing but float rounding), with `room` free slots after."""
        length = max(c.length for c in caches)
        first = caches[0]
        B = sum(c.batch_size for c in caches)
        like = first.keys[0]
        shape = (B, like.size(1), length + room, like.size(3))  # (B, H, slots, d_k)
        keys = [like.new_zeros(shape) for _ in first.keys]
        values = [like.new_zeros(shape) for _ in first.keys]
        key_mask = torch.zeros(B, length + room, dtype=torch.bool, device=like.device)
        row = 0
        for c in caches:
            rows, pad = slice(row, row + c.batch_size), length - c.length
            for i in range(len(first.keys)):
                keys[i][rows, :, pad:length] = c.keys[i][:, :, : c.length]
                values[i][rows, :, pad:length] = c.values[i][:, :, : c.length]
            key_mask[rows, pad:length] = c.key_mask[:, : c.length]
            row += c.batch_size
        key_mask[:, length:] = True  # slots to come are written as they are filled
        has_padding = bool((~key_mask[:, :length]).any())
        return cls(keys, values, key_mask, length, has_padding)
