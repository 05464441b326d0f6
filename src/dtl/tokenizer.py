"""Tokenizers: GPT-2's BPE (through tiktoken, from the files shipped in `dtl/assets/gpt2`)
or a BPE trained on your corpus.

>>> tok = load_tokenizer("gpt2")  # no cache, no network: the package carries GPT-2's files
>>> tok.encode("Hello world"), tok.eos_id
([15496, 995], 50256)
>>> tok.save("my-model")
>>> load_tokenizer("my-model").name
'gpt2'

Special-token text such as "<|endoftext|>" inside a string is encoded as ordinary text: only
the pipeline itself ever emits `eos_id`, so user text can never forge an end of document.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from dtl.errors import DtlError
from dtl.fileio import atomic_copy, atomic_write_text, disk_full_as_error, read_lines

EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50_257
# tiktoken's r50k / gpt2 pre-tokenizer split (the same regex GPT-2's encoder.py used).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
CONFIG_FILE = "tokenizer_config.json"
# The two spellings of the same pair of files: OpenAI's and Hugging Face's.
GPT2_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
# Every file a tokenizer folder may hold (what `--force` may replace).
TOKENIZER_FILES = {CONFIG_FILE, *(name for pair in GPT2_FILE_PAIRS for name in pair)}
GPT2_HELP = (
    "put GPT-2's encoder.json + vocab.bpe (or Hugging Face's vocab.json + merges.txt) in a folder "
    "and pass it with --gpt2-dir DIR or the environment variable DTL_GPT2_DIR"
)
# GPT-2's own encoder.json + vocab.bpe (OpenAI, MIT-style licence beside them), package data.
PACKAGED_GPT2_DIR = Path(__file__).resolve().parent / "assets" / "gpt2"


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for bytes, reversed: char -> byte value."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    visible += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:  # control and space bytes map past 255 so every byte prints as one character
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _token_bytes(token: str) -> bytes:
    decoder = _byte_decoder()
    return bytes(decoder[c] for c in token)


@dataclass
class Tokenizer:
    """A loaded tokenizer: `encode`, `encode_batch`, `decode`, `decode_bytes`, `save`."""

    name: str  # "gpt2" or "bpe"
    vocab_size: int
    eos_id: int
    files: dict[str, Path]  # what `save` copies: vocab.json + merges.txt (HF names)
    _tiktoken: Any = None  # a tiktoken.Encoding (gpt2)
    _hf: Any = None  # a tokenizers.Tokenizer (trained BPE)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no end-of-text appended)."""
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel threads."""
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary_batch(
                list(texts), num_threads=os.cpu_count() or 1
            )
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (a token can end mid-character; stream with this)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DtlError(
                f"token id {bad[0]} is outside the {self.name} vocabulary (0..{self.vocab_size - 1})"
            )
        if self._tiktoken is not None:
            return self._tiktoken.decode_bytes(ids)
        return b"".join(self._id_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; a broken UTF-8 sequence becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's files into `directory` so `load_tokenizer(directory)` restores it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for target, source in self.files.items():
            if source.resolve() != (directory / target).resolve():
                atomic_copy(source, directory / target)
        config = {"dtl_tokenizer": self.name, "vocab_size": self.vocab_size, "eos_token": EOT_TEXT}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    @functools.cached_property
    def _bytes_table(self) -> list[bytes]:
        vocab = self._hf.get_vocab()
        table = [b""] * self.vocab_size
        for token, i in vocab.items():
            table[i] = EOT_TEXT.encode() if token == EOT_TEXT else _token_bytes(token)
        return table

    def _id_bytes(self, i: int) -> bytes:
        return self._bytes_table[i]


def _find_pair(directory: Path) -> tuple[Path, Path] | None:
    for vocab, merges in GPT2_FILE_PAIRS:
        if (directory / vocab).is_file() and (directory / merges).is_file():
            return directory / vocab, directory / merges
    return None


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DtlError(f"{path}: not a readable BPE vocabulary JSON ({err})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise DtlError(f"{path}: expected a JSON object mapping token -> id")
    return vocab


@functools.lru_cache(maxsize=4)
def _gpt2_from_files(vocab_path: str, merges_path: str) -> Tokenizer:
    vocab = _read_vocab(Path(vocab_path))
    if len(vocab) != GPT2_VOCAB_SIZE or vocab.get(EOT_TEXT) != GPT2_VOCAB_SIZE - 1:
        raise DtlError(
            f"{vocab_path}: has {len(vocab)} tokens, not GPT-2's {GPT2_VOCAB_SIZE} with "
            f"{EOT_TEXT} = {GPT2_VOCAB_SIZE - 1}; {GPT2_HELP}"
        )
    # GPT-2 numbers every token in merge order, so an id is also its BPE rank (what tiktoken wants).
    ranks = {_token_bytes(tok): i for tok, i in vocab.items() if tok != EOT_TEXT}
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: GPT2_VOCAB_SIZE - 1},
    )
    return _gpt2_tokenizer(encoding, _files(vocab_path, merges_path))


def _gpt2_tokenizer(encoding: tiktoken.Encoding, files: dict[str, Path]) -> Tokenizer:
    return Tokenizer("gpt2", GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE - 1, files, _tiktoken=encoding)


def _files(vocab_path: str, merges_path: str) -> dict[str, Path]:
    """The pair of files `save` copies, under Hugging Face's names."""
    return {"vocab.json": Path(vocab_path), "merges.txt": Path(merges_path)}


def _byte_level(bpe: models.BPE) -> HFTokenizer:
    """A tokenizers BPE behind GPT-2's byte-level pre-tokenizer (no space added in front)."""
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return hf


def _gpt2(gpt2_dir: str | os.PathLike | None) -> Tokenizer:
    where = gpt2_dir if gpt2_dir is not None else os.environ.get("DTL_GPT2_DIR")
    if where:
        directory = Path(where)
        pair = _find_pair(directory) if directory.is_dir() else None
        if pair is None:
            origin = "--gpt2-dir" if gpt2_dir is not None else "DTL_GPT2_DIR"
            raise DtlError(f"{origin} {directory} holds no GPT-2 BPE files; {GPT2_HELP}")
        return _gpt2_from_files(str(pair[0].resolve()), str(pair[1].resolve()))
    pair = _find_pair(PACKAGED_GPT2_DIR)
    if pair is None:  # only a damaged install lacks them
        raise DtlError(
            f"GPT-2's tokenizer files are missing from this installation ({PACKAGED_GPT2_DIR}); "
            f"reinstall dtl, or {GPT2_HELP}"
        )
    return _gpt2_from_files(str(pair[0]), str(pair[1]))


def _bpe_from_files(vocab_path: str, merges_path: str) -> Tokenizer:
    # Keyed on the files' mtimes too, so retraining into the same folder is never served stale.
    stamp = (os.stat(vocab_path).st_mtime_ns, os.stat(merges_path).st_mtime_ns)
    return _bpe_cached(vocab_path, merges_path, stamp)


@functools.lru_cache(maxsize=4)
def _bpe_cached(vocab_path: str, merges_path: str, stamp: tuple[int, int]) -> Tokenizer:
    vocab = _read_vocab(Path(vocab_path))
    if EOT_TEXT not in vocab:
        raise DtlError(
            f"{vocab_path}: the vocabulary has no {EOT_TEXT} token; retrain with dtl tokenizer train"
        )
    try:
        bpe = models.BPE.from_file(vocab_path, merges_path)
    except Exception as err:
        raise DtlError(f"{merges_path}: not a readable BPE merges file ({err})") from None
    hf = _byte_level(bpe)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer("bpe", len(vocab), vocab[EOT_TEXT], _files(vocab_path, merges_path), _hf=hf)


def _from_directory(directory: Path, gpt2_dir: str | os.PathLike | None) -> Tokenizer:
    config: dict[str, Any] = {}
    if (directory / CONFIG_FILE).is_file():
        try:
            config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DtlError(f"{directory / CONFIG_FILE}: not valid JSON ({err})") from None
    pair = _find_pair(directory)
    kind = config.get("dtl_tokenizer")
    if pair is None:
        if kind == "gpt2":  # saved with no files beside it (older DTL, from tiktoken's cache)
            return _gpt2(gpt2_dir)
        raise DtlError(
            f"{directory} holds no tokenizer (expected vocab.json + merges.txt, or encoder.json + "
            f"vocab.bpe); pass --tokenizer gpt2, or a folder written by dtl tokenizer train"
        )
    vocab_path, merges_path = (str(p.resolve()) for p in pair)
    if kind == "gpt2" or (kind is None and len(_read_vocab(pair[0])) == GPT2_VOCAB_SIZE):
        return _gpt2_from_files(vocab_path, merges_path)
    return _bpe_from_files(vocab_path, merges_path)


def load_tokenizer(
    spec: str | os.PathLike = "gpt2", gpt2_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """`"gpt2"`, or a directory holding tokenizer files (a trained BPE, a model or data dir).

    GPT-2's files come from `gpt2_dir`, else `$DTL_GPT2_DIR`, else the copy shipped inside the
    package (`dtl/assets/gpt2`): no cache and no network needed.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if str(spec) == "gpt2":
        return _gpt2(gpt2_dir)
    directory = Path(spec)
    if not directory.is_dir():
        raise DtlError(
            f"tokenizer {str(spec)!r} is neither 'gpt2' nor a directory; pass --tokenizer gpt2 or a "
            f"folder written by dtl tokenizer train (or a model dir)"
        )
    return _from_directory(directory, gpt2_dir)


def check_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE's size: the 256 bytes + end-of-text at least, a million at most."""
    if not 257 <= vocab_size <= 1_000_000:
        raise DtlError(
            f"--vocab-size {vocab_size} must be between 257 (256 bytes + end-of-text) and 1,000,000"
        )


def train_tokenizer(
    files: list[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    min_frequency: int = 2,
    show_progress: bool = True,
    overwrite: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2's algorithm) on text files and save it into `out_dir`.

    The files are written into a temporary folder beside `out_dir` and renamed into place
    once they load back, so a failure leaves nothing half-written. A tokenizer already in
    `out_dir` is replaced only with `overwrite=True` (`--force`); other files never are.

    >>> tok = train_tokenizer(["corpus.txt"], 8192, "tok-8k")  # doctest: +SKIP
    """
    check_vocab_size(vocab_size)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    paths = [Path(f) for f in files]
    if not paths:
        raise DtlError("no input files given; pass one or more text files")
    for path in paths:
        if not path.is_file():
            raise DtlError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise DtlError(f"{path}: the file is empty; give text to learn merges from")
        _check_utf8(path)
    hf = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the end-of-text entry is added after training
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    try:
        hf.train([str(p) for p in paths], trainer)
    except Exception as err:  # the Rust side reports bad UTF-8 as a generic exception
        raise DtlError(
            f"training the tokenizer failed on {', '.join(map(str, paths))}: {err}"
        ) from None
    target = out_dir.resolve()  # `-o .` has no name to put a staging folder beside
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:  # a full disk names the folder the user gave, not the staging one
        with disk_full_as_error(out_dir, "free space or choose another output folder"):
            _save_trained(hf, staging)
            _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _bpe_from_files(
        str((out_dir / "vocab.json").resolve()), str((out_dir / "merges.txt").resolve())
    )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """`-o` must name a folder that is new, empty, or (with --force) a tokenizer to replace.

    Even --force never replaces a folder holding other files (a corpus, a model): the swap
    would delete them."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DtlError(f"-o {out_dir} is a file, not a folder; give a new folder name")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    others = [name for name in held if name not in TOKENIZER_FILES]
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise DtlError(
            f"-o {out_dir} already holds files that are not a tokenizer's ({listed}); choose a "
            f"new or empty folder (nothing was changed)"
        )
    if held and not overwrite:
        raise DtlError(
            f"-o {out_dir} already holds a tokenizer; pass --force to replace it, or choose a "
            f"new folder (nothing was changed)"
        )


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Move the finished tokenizer from `staging` to `out_dir`: one rename for a new folder;
    into an existing one (empty, or a tokenizer `--force` replaces; possibly the working
    directory, which must stay), file by file, each an atomic rename."""
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out_dir)
        return
    for name in TOKENIZER_FILES - {p.name for p in staging.iterdir()}:
        (out_dir / name).unlink(missing_ok=True)  # e.g. GPT-2's encoder.json, read first
    for path in sorted(staging.iterdir(), key=lambda p: p.name == CONFIG_FILE):
        os.replace(path, out_dir / path.name)  # the config, which names the kind, last


def _check_utf8(path: Path) -> None:
    for _ in read_lines(path):  # raises a DtlError naming the line with a bad byte
        pass


def _save_trained(hf: Any, out_dir: Path) -> Tokenizer:
    model = json.loads(hf.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    # A plain vocabulary entry, not an "added token": no text can ever encode to it.
    vocab[EOT_TEXT] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    # One merge a line; none at all (text too small to repeat a pair) is the header alone.
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    tok = _bpe_from_files(
        str((out_dir / "vocab.json").resolve()), str((out_dir / "merges.txt").resolve())
    )
    tok.save(out_dir)
    return tok
