"""Writing token shards: flat token files, optional loss masks and example offsets.

>>> w = ShardWriter(Path("tmp"), "train", np.uint16, with_mask=False, with_offsets=True)  # doctest: +SKIP
>>> w.append(np.array([10, 11, 50256]), None); w.close()                               # doctest: +SKIP

The files are plain little-endian arrays, so `np.memmap` reads them back (see loader.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from dtl.errors import DtlError


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65_535 else np.uint32)


class ShardWriter:
    """Appends examples of one split to `{split}.bin` (+ `.mask`, + `.idx`)."""

    def __init__(
        self, directory: Path, split: str, dtype: np.dtype, with_mask: bool, with_offsets: bool
    ) -> None:
        self.directory, self.split, self.dtype = directory, split, np.dtype(dtype)
        self.tokens = open(directory / f"{split}.bin", "wb")
        self.mask = open(directory / f"{split}.mask", "wb") if with_mask else None
        self.offsets: list[int] | None = [0] if with_offsets else None
        self.n_tokens = 0
        self.n_examples = 0

    def append(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        """One example (or document): its ids and, with masks, 1 where a token is a loss target."""
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.n_tokens += len(ids)
        self.n_examples += 1
        if self.offsets is not None:
            self.offsets.append(self.n_tokens)

    def tell(self) -> tuple[int, int]:
        """(tokens, examples) written so far, for `truncate`."""
        return self.n_tokens, self.n_examples

    def read_tail(
        self, position: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
        """Tokens, mask and example lengths written after `position`."""
        self._flush()
        start = position[0]
        ids = np.fromfile(self.directory / f"{self.split}.bin", dtype=self.dtype)[start:]
        mask = None
        if self.mask is not None:
            mask = np.fromfile(self.directory / f"{self.split}.mask", dtype=np.uint8)[start:]
        lengths = []
        if self.offsets is not None:
            tail = self.offsets[position[1] :]
            lengths = [b - a for a, b in zip(tail[:-1], tail[1:], strict=True)]
        return ids, mask, lengths

    def truncate(self, position: tuple[int, int]) -> None:
        """Forget everything written after `position`."""
        self._flush()
        tokens, examples = position
        self.tokens.truncate(tokens * self.dtype.itemsize)
        self.tokens.seek(0, os.SEEK_END)
        if self.mask is not None:
            self.mask.truncate(tokens)
            self.mask.seek(0, os.SEEK_END)
        if self.offsets is not None:
            del self.offsets[examples + 1 :]
        self.n_tokens, self.n_examples = tokens, examples

    def _flush(self) -> None:
        self.tokens.flush()
        if self.mask is not None:
            self.mask.flush()

    def close(self) -> None:
        self.tokens.close()
        if self.mask is not None:
            self.mask.close()
        if self.offsets is not None:
            np.asarray(self.offsets, dtype=np.uint64).tofile(self.directory / f"{self.split}.idx")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def staging_dir(out_dir: Path) -> Path:
    """A fresh sibling folder to build into; `commit_dir` renames it into place."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise DtlError(f"{out_dir} exists and is not a directory; choose another -o")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise DtlError(
            f"{out_dir} already holds files that are not a prepared data dir; refusing to "
            f"overwrite them: choose an empty or new -o folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out_dir: Path) -> None:
    """Swap the finished `tmp` in for `out_dir` (an older data dir there is replaced)."""
    out_dir = out_dir.resolve()
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
