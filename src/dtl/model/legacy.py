"""Checkpoints of the original DTL training scripts: `torch.save`d `.pt` files.

Those are dicts with `model_state_dict` (or a bare state dict), whose parameter names are the
ones `TransformerLM` keeps. The shapes give every size but n_heads (12 when d_model is 768,
else 8, unless given) and max_seq_length (the saved positional table's length, unless given).
Loading never runs code from the file (`weights_only=True`).

>>> config, state = read_legacy_checkpoint("best_model.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from dtl.errors import DtlError
from dtl.model.config import ModelConfig


def read_legacy_checkpoint(
    path: str | os.PathLike, n_heads: int | None = None, max_seq_length: int | None = None
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The model config the tensors imply, and the state dict to load into it."""
    state = _load_state(Path(path), mmap=False)
    return _implied_config(state, n_heads, max_seq_length), state


def read_legacy_config(
    path: str | os.PathLike, n_heads: int | None = None, max_seq_length: int | None = None
) -> ModelConfig:
    """The model config a `.pt` file's tensors imply, without reading the tensors' data: the
    file is memory-mapped and only the shapes are looked at (a file from a torch older than
    1.6, not a zip archive, cannot be mapped and is read whole).

    >>> read_legacy_config("best_model.pt").d_model  # doctest: +SKIP
    768
    """
    path = Path(path)
    try:
        state = _load_state(path, mmap=True)
    except _NotMappable:
        state = _load_state(path, mmap=False)
    return _implied_config(state, n_heads, max_seq_length)


class _NotMappable(Exception):
    pass


def _load_state(path: Path, mmap: bool) -> dict[str, Tensor]:
    """The state dict a `.pt` file holds (no code from the file runs), prefixes stripped."""
    if not path.is_file():
        raise DtlError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickle errors come in many types
        if mmap:  # e.g. the pre-zip format: let the caller read it whole
            raise _NotMappable from None
        raise DtlError(f"{path}: not a loadable PyTorch checkpoint ({err})") from None
    state = blob.get("model_state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or "embedding.weight" not in _strip_prefixes(state):
        raise DtlError(
            f"{path}: not a DTL checkpoint (expected a state dict with 'embedding.weight', "
            "or a dict holding one under 'model_state_dict')"
        )
    return _strip_prefixes(state)


def _implied_config(
    state: dict[str, Tensor], n_heads: int | None, max_seq_length: int | None
) -> ModelConfig:
    """The sizes the tensors' shapes give; the saved positional table is dropped from
    `state` (it is recomputed, not loaded)."""
    pe = state.pop("pos_encoding.pe", None)  # (max_len, 1, d_model)
    vocab_size, d_model = state["embedding.weight"].shape
    n_layers = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    d_ff = state["transformer_blocks.0.feed_forward.linear1.weight"].shape[0]
    if n_heads is None:
        n_heads = 12 if d_model == 768 else 8
    if max_seq_length is None:
        max_seq_length = int(pe.shape[0]) if pe is not None else 512
    return ModelConfig(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        n_heads=n_heads,
        n_layers=n_layers,
        d_ff=int(d_ff),
        max_seq_length=max_seq_length,
    )


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes some saves carry."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out
