"""Writing token shards: flat token files, optional loss masks and example offsets.

>>> Path("tmp").mkdir()
>>> w = ShardWriter(Path("tmp"), "train", np.uint16, with_mask=False, with_offsets=True)
>>> w.append(np.array([10, 11, 50256]), None); w.close()
>>> np.fromfile("tmp/train.bin", dtype="<u2").tolist()
[10, 11, 50256]

The files are plain little-endian arrays, so `np.memmap` reads them back (see loader.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np

from dtl.errors import DtlError
from dtl.fileio import remove_stale


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65_535 else np.uint32)


class ShardWriter:
    """Appends examples of one split to `{split}.bin` (+ `.mask`, + `.idx`)."""

    def __init__(
        self, directory: Path, split: str, dtype: np.dtype, with_mask: bool, with_offsets: bool
    ) -> None:
        self.directory, self.split, self.dtype = directory, split, np.dtype(dtype)
        self.with_mask, self.with_offsets = with_mask, with_offsets
        self.tokens = open(directory / f"{split}.bin", "wb")
        self.mask = open(directory / f"{split}.mask", "wb") if with_mask else None
        self.offsets: list[int] | None = [0] if with_offsets else None
        self.n_tokens = 0
        self.n_examples = 0

    def append(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        """One example (or document): its ids and, with masks, 1 where a token is a loss target."""
        self.extend(ids, mask)
        self.end_examples([self.n_tokens])

    def extend(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        """Tokens (and mask flags) that do not end an example by themselves, e.g. a stretch
        copied from another shard in chunks; `end_examples` says where examples end."""
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.n_tokens += len(ids)

    def end_examples(self, ends: list[int]) -> None:
        """Count examples ending at these token positions of this split (ascending)."""
        self.n_examples += len(ends)
        if self.offsets is not None:
            self.offsets.extend(ends)

    def paths(self) -> list[Path]:
        """The files this writer writes."""
        suffixes = [".bin"] + [".mask"] * self.with_mask + [".idx"] * self.with_offsets
        return [self.directory / f"{self.split}{suffix}" for suffix in suffixes]

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


# Shard files up to this size are hashed whole (~0.5 s a GiB); larger ones by SAMPLE_BLOCKS
# evenly spaced 1 MiB blocks, the first and last included, and their size.
FULL_HASH_LIMIT = 1 << 30
SAMPLE_BLOCKS = 256
SHARD_SUFFIXES = (".bin", ".mask", ".idx")


def data_fingerprint(data_dir: str | os.PathLike) -> str:
    """A sha256 over a prepared data dir's shards (names, sizes, contents): the tokens a run
    reads, in their order. Preparing the same text again gives the same fingerprint; another
    document order or text gives another.

    >>> data_fingerprint("data/wiki")  # doctest: +ELLIPSIS
    'sha256:...'
    """
    digest = hashlib.sha256()
    for path in sorted(Path(data_dir).iterdir()):
        if path.suffix not in SHARD_SUFFIXES or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= FULL_HASH_LIMIT:
                while block := f.read(1 << 20):
                    digest.update(block)
                continue
            step = (size - (1 << 20)) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * step)
                digest.update(f.read(1 << 20))
    return "sha256:" + digest.hexdigest()


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
    # What a killed prepare of this same dir left (`.NAME.partial-PID`, `.NAME.old-PID`).
    remove_stale(out_dir.parent, rf"^\.{re.escape(out_dir.name)}\.(?:partial|old)-(?P<pid>\d+)$")
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
