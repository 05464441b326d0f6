"""Batches from a prepared data dir: deterministic, resumable, rank-aware.

>>> loader = BatchLoader("data/wiki", "train", batch_size=8, seed=0)
>>> batch = next(iter(loader))
>>> batch["input_ids"].shape, batch["targets"].shape
(torch.Size([8, 512]), torch.Size([8, 512]))
>>> short = BatchLoader("data/wiki", "train", batch_size=8, seq_len=128)
>>> next(iter(short))["input_ids"].shape  # the first 128 tokens of the same rows
torch.Size([8, 128])
>>> state = loader.state_dict()        # save with the checkpoint
>>> after = next(loader)["input_ids"]
>>> loader.load_state_dict(state)      # the next batch is the one an unbroken run sees
>>> torch.equal(next(loader)["input_ids"], after)
True

Layout of a data dir (written by `dtl.data.prepare`):
  meta.json          tokenizer, vocab_size, dtype, mode ("pack" | "pad"), max_length, ...
  {split}.bin        all tokens of the split, flat uint16 (uint32 for vocabularies > 65,535)
  {split}.idx        pad mode only: uint64 start offsets of each example (n_examples + 1)
  {split}.mask       when meta["loss_mask"]: uint8 per token, 1 = the token is a loss target
A pack-mode row i is tokens[i*L : i*L + L + 1] (L = max_length): input = the first L,
target = the last L. A pad-mode row is one example, cut to L + 1 tokens, then right-padded.
Read with seq_len T < L, each row is cut to its first T + 1 tokens (T inputs, T targets):
the rows, their number and their order stay those of L.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtl.errors import DtlError

IGNORE_INDEX = -100
META_FILE = "meta.json"
SPLITS = ("train", "val")


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared data dir, or a DtlError saying how to make one."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DtlError(
            f"{data_dir} is not a prepared data dir (no {META_FILE}); run dtl prepare INPUT -o "
            f"{data_dir} first, or pass a raw file with --data"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DtlError(f"{path}: not valid JSON ({err}); re-run dtl prepare") from None
    for key in ("tokenizer", "vocab_size", "mode", "max_length", "dtype"):
        if key not in meta:
            raise DtlError(f"{path}: missing {key!r}; re-run dtl prepare")
    return meta


def read_array(path: Path, dtype: Any) -> np.ndarray:
    """A shard file as a read-only array (memory-mapped; np.memmap refuses an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset of one split: item i is a dict of (T,) LongTensors, T = seq_len
    (default: the data's max_length; at most that)."""

    def __init__(
        self, data_dir: str | os.PathLike, split: str = "train", seq_len: int | None = None
    ) -> None:
        if split not in SPLITS:
            raise DtlError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.data_dir, self.split = Path(data_dir), split
        self.meta = read_meta(data_dir)
        self.max_length = int(self.meta["max_length"])  # L: where rows start
        self.seq_len = self.max_length if seq_len is None else seq_len  # T: what is read of them
        if not 1 <= self.seq_len <= self.max_length:
            raise DtlError(
                f"seq_len {self.seq_len} must be in 1..{self.max_length}, the length of the "
                f"rows of {self.data_dir}"
            )
        self.mode = self.meta["mode"]
        self.eos_id = int(self.meta.get("eos_id", 0))
        self.tokens = self._open(".bin", self.meta["dtype"])
        self.mask = self._open(".mask", "uint8") if self.meta.get("loss_mask") else None
        if self.mask is not None and len(self.mask) != len(self.tokens):
            raise DtlError(
                f"{self.data_dir}/{split}.mask does not match {split}.bin; re-run dtl prepare"
            )
        if self.mode == "pad":
            self.offsets = self._open(".idx", "uint64")
            self.n_rows = max(len(self.offsets) - 1, 0)
        elif self.mode == "pack":
            self.n_rows = max(len(self.tokens) - 1, 0) // self.max_length
        else:
            raise DtlError(f"{self.data_dir}/{META_FILE}: unknown mode {self.mode!r}")

    def _open(self, suffix: str, dtype: str) -> np.ndarray:
        path = self.data_dir / f"{self.split}{suffix}"
        if not path.is_file():
            raise DtlError(f"{path} is missing; the data dir is incomplete, re-run dtl prepare")
        return read_array(path, dtype)

    def __len__(self) -> int:
        return self.n_rows

    def rows_at(self, offset: int) -> int:
        """Pack mode: the whole rows of L + 1 tokens that start at `offset` + i * L."""
        return max(len(self.tokens) - 1 - offset, 0) // self.max_length

    def row(self, i: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, loss-target flags) of row i, up to T + 1 long (T = seq_len); a pack-mode
        row starts `offset` tokens later than the data's own row i."""
        L, T = self.max_length, self.seq_len
        if self.mode == "pack":
            start = offset + i * L
            end = start + T + 1
        else:
            start, end = (
                int(self.offsets[i]),
                min(int(self.offsets[i + 1]), int(self.offsets[i]) + T + 1),
            )
        ids = np.asarray(self.tokens[start:end], dtype=np.int64)
        flags = (
            np.ones(len(ids), dtype=bool)
            if self.mask is None
            else np.asarray(self.mask[start:end], dtype=bool)
        )
        return ids, flags

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.item(i)

    def item(self, i: int, offset: int = 0) -> dict[str, torch.Tensor]:
        """Row i as tensors (`row`); `offset` > 0 (pack mode) shifts the row boundaries."""
        n_rows = self.n_rows if offset == 0 else self.rows_at(offset)
        if not 0 <= i < n_rows:
            raise IndexError(f"row {i} out of range for {n_rows} rows")
        T = self.seq_len
        ids, flags = self.row(i, offset)
        n = len(ids) - 1  # real input positions
        input_ids = torch.full((T,), self.eos_id, dtype=torch.long)
        targets = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(T, dtype=torch.long)
        input_ids[:n] = torch.from_numpy(ids[:-1])
        target = torch.from_numpy(ids[1:])
        targets[:n] = torch.where(torch.from_numpy(flags[1:]), target, IGNORE_INDEX)
        attention_mask[:n] = 1
        return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask}


def epoch_batches(rows: int, global_batch: int) -> int:
    """Batches in one epoch of `rows` rows: whole global batches (the tail dropped), at
    least 1 (a split smaller than one batch repeats rows to fill it).

    >>> epoch_batches(100, 8), epoch_batches(3, 8)
    (12, 1)
    """
    return max(1, rows // global_batch)


class BatchLoader:
    """Endless batches of one split, `{"input_ids", "targets", "attention_mask"}`, each (B, T),
    T = seq_len (default: the data's max_length; a shorter one reads the first T tokens of
    each row, so the rows and their order do not depend on it).

    Epoch e visits the rows in a permutation seeded by (seed, e) (or in order when
    shuffle=False), cut into global batches of batch_size * world_size rows; rank r takes rows
    [r*B:(r+1)*B] of each, so 2 ranks with batch B see exactly what 1 process with 2B sees.
    An epoch has max(1, rows // global batch) batches; the tail is dropped, or, when a split
    has fewer rows than one global batch, rows repeat to fill it.

    `offsets=True` (packed data read more than once: `dtl.train.config.repeats_data`): epoch
    e >= 1 cuts the token stream into rows that start at a random offset in [0, L), seeded by
    (seed, e), so every later pass shows the model other contexts of the same tokens (the
    reason nanoGPT samples windows anywhere), and the tail a whole-row cut drops is read too.
    Epoch 0 keeps offset 0: a run that reads its data once sees exactly what it saw without.
    The offset follows from (seed, epoch) alone, so a resume is exact; the setting is saved
    with the position and a resume keeps the saved one. Pad-mode rows are examples: no offset.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seq_len: int | None = None,
        offsets: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DtlError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DtlError(f"rank {rank} is not in 0..{world_size - 1}")
        self.dataset = TokenDataset(data_dir, split, seq_len=seq_len)
        if len(self.dataset) == 0:
            raise DtlError(self._empty_message(data_dir, split))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle = shuffle
        self.offsets = offsets
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = epoch_batches(len(self.dataset), self.global_batch)
        self.epoch, self.batch_in_epoch = 0, 0
        self._order: np.ndarray | None = None
        self._offset = 0  # where epoch `self.epoch`'s rows start (pack mode, `offsets`)

    def _empty_message(self, data_dir: Any, split: str) -> str:
        ds = self.dataset
        if ds.mode == "pack":
            return (
                f"the {split} split of {data_dir} has {len(ds.tokens)} tokens, fewer than "
                f"max_length + 1 = {ds.max_length + 1}; prepare more text, re-run "
                f"`dtl prepare --max-length N` with a smaller N, or use a larger --val-fraction"
            )
        return f"the {split} split of {data_dir} has no examples; prepare more data or a larger --val-fraction"

    def epoch_offset(self, epoch: int) -> int:
        """Where epoch `epoch`'s rows start in the token stream: 0, or with `offsets` (pack
        mode) from epoch 1 on a random offset in [0, L) seeded by (seed, epoch).

        >>> loader = BatchLoader("data/wiki", "train", 8, offsets=True)
        >>> loader.epoch_offset(0), 0 <= loader.epoch_offset(1) < loader.dataset.max_length
        (0, True)
        """
        if not self.offsets or epoch == 0 or self.dataset.mode != "pack":
            return 0
        # A stream of its own (the trailing 1), so the rows' permutation keeps its draws.
        rng = np.random.default_rng([self.seed, epoch, 1])
        offset = int(rng.integers(0, self.dataset.max_length))
        return offset if self.dataset.rows_at(offset) > 0 else 0

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset) if self._offset == 0 else self.dataset.rows_at(self._offset)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(n)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of this rank (advances the position)."""
        if self._order is None:
            self._offset = self.epoch_offset(self.epoch)
            self._order = self._epoch_order(self.epoch)
        n = len(self._order)
        start = self.batch_in_epoch * self.global_batch + self.rank * self.batch_size
        rows = [int(self._order[(start + j) % n]) for j in range(self.batch_size)]
        items = [self.dataset.item(r, self._offset) for r in rows]
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch, self._order = self.epoch + 1, 0, None
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The position (plus what must match on resume, and `offsets`, which a resume keeps)."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "rows": len(self.dataset),
            "offsets": int(self.offsets),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`: the next batch is the one the saved run would see."""
        for key in ("seed", "global_batch", "rows"):
            if key in state and int(state[key]) != getattr(self, key if key != "rows" else "_rows"):
                raise DtlError(
                    f"cannot resume the data loader: saved {key}={state[key]} but this run has "
                    f"{getattr(self, key if key != 'rows' else '_rows')}; resume with the same data "
                    f"dir, seed and batch_size x world_size"
                )
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        # The data order is the run's from its start (a checkpoint from before offsets: none),
        # even when this launch's plan (e.g. a longer --max-steps) would choose otherwise.
        self.offsets = bool(int(state.get("offsets", 0)))
        self._order = None

    @property
    def _rows(self) -> int:
        return len(self.dataset)
