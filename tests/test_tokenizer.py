"""dtl.tokenizer against independent implementations: the `tokenizers` library's BPE on the
same GPT-2 files, a from-scratch reference BPE (GPT-2's encoder.py algorithm), published ids."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import PROJECT_ROOT, WIKITEXT, gpt2_oracle, run_cli, shared_path

import dtl.tokenizer as tokenizer_module
from dtl.errors import DtlError
from dtl.tokenizer import EOT_TEXT, load_tokenizer, train_tokenizer

PRETOKENIZE = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, written out as in OpenAI's encoder.py."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def reference_bpe(text: str, vocab_path: Path, merges_path: Path) -> list[int]:
    """The merge-rank BPE of GPT-2's original encoder.py (slow, obviously correct)."""
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    lines = [
        ln
        for ln in merges_path.read_text(encoding="utf-8").split("\n")
        if ln and not ln.startswith("#version")
    ]
    ranks = {tuple(ln.split()): i for i, ln in enumerate(lines)}
    table = _bytes_to_unicode()
    ids: list[int] = []
    for piece in PRETOKENIZE.findall(text):
        word = [table[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [
                (ranks.get((a, b), float("inf")), i)
                for i, (a, b) in enumerate(zip(word, word[1:], strict=False))
            ]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            word = word[:i] + [word[i] + word[i + 1]] + word[i + 2 :]
        ids.extend(vocab[token] for token in word)
    return ids


@pytest.fixture(scope="module")
def wiki_text() -> str:
    return shared_path(*WIKITEXT).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, wiki_text) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    corpus = out / "corpus.txt"
    corpus.write_text(wiki_text[:300_000], encoding="utf-8")
    train_tokenizer([corpus], 1000, out / "tok", show_progress=False)
    return out / "tok"


def test_gpt2_matches_tokenizers_bpe_on_the_whole_wikitext_test_split(gpt2_dir, wiki_text):
    expected = gpt2_oracle(gpt2_dir).encode(wiki_text).ids
    ours = load_tokenizer("gpt2", gpt2_dir=gpt2_dir).encode(wiki_text)
    assert len(expected) == 283_287  # the count the issue gives for tiktoken and tokenizers
    assert ours == expected


def test_gpt2_published_ids_and_sizes(gpt2_dir):
    tok = load_tokenizer("gpt2", gpt2_dir=gpt2_dir)
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("gpt2", 50_257, 50_256)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.decode([tok.eos_id]) == EOT_TEXT


def test_gpt2_equals_reference_bpe_on_mixed_text(gpt2_dir, wiki_text):
    text = wiki_text[:20_000] + " naïve café — 東京 🙂 it's we'll  \t\n  x"
    tok = load_tokenizer("gpt2", gpt2_dir=gpt2_dir)
    assert tok.encode(text) == reference_bpe(
        text, gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe"
    )


def test_special_token_text_is_ordinary_text(gpt2_dir, trained):
    for tok in (load_tokenizer("gpt2", gpt2_dir=gpt2_dir), load_tokenizer(trained)):
        ids = tok.encode(f"a {EOT_TEXT} b")
        assert tok.eos_id not in ids
        assert tok.decode(ids) == f"a {EOT_TEXT} b"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60))
def test_roundtrip_arbitrary_unicode(gpt2_dir, trained, text):
    for tok in (load_tokenizer("gpt2", gpt2_dir=gpt2_dir), load_tokenizer(trained)):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # Streaming: the bytes of the tokens, one by one, are the text's UTF-8.
        assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8")


def test_encode_batch_equals_encode(gpt2_dir, trained, wiki_text):
    texts = [wiki_text[i : i + 500] for i in range(0, 20_000, 500)]
    for tok in (load_tokenizer("gpt2", gpt2_dir=gpt2_dir), load_tokenizer(trained)):
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_trained_bpe_equals_reference_bpe_and_compresses(trained, wiki_text):
    tok = load_tokenizer(trained)
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("bpe", 1000, 999)
    sample = wiki_text[300_000:330_000]
    ids = tok.encode(sample)
    assert ids == reference_bpe(sample, trained / "vocab.json", trained / "merges.txt")
    assert len(ids) < len(sample.encode("utf-8")) / 2  # 1k merges halve the bytes of English
    assert max(ids) < tok.vocab_size


def test_save_into_a_model_dir_restores_offline(gpt2_dir, tmp_path, monkeypatch, trained):
    text = "Saved beside a model, loaded without DTL_GPT2_DIR."
    gpt2 = load_tokenizer("gpt2", gpt2_dir=gpt2_dir)
    gpt2.save(tmp_path / "model")
    monkeypatch.delenv("DTL_GPT2_DIR", raising=False)
    again = load_tokenizer(tmp_path / "model")
    assert again.name == "gpt2" and again.encode(text) == gpt2.encode(text)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "model").iterdir()
    }
    bpe = load_tokenizer(trained)
    bpe.save(tmp_path / "model2")
    assert load_tokenizer(tmp_path / "model2").encode(text) == bpe.encode(text)


def test_hugging_face_file_names_work(gpt2_dir, tmp_path):
    shutil.copy(gpt2_dir / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_dir / "vocab.bpe", tmp_path / "merges.txt")
    tok = load_tokenizer("gpt2", gpt2_dir=tmp_path)
    assert tok.encode("Hello world") == [15496, 995]


def test_missing_gpt2_files_say_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DTL_GPT2_DIR", str(tmp_path))
    with pytest.raises(
        DtlError, match=r"DTL_GPT2_DIR .* holds no GPT-2 BPE files.*encoder\.json \+ vocab\.bpe"
    ):
        load_tokenizer("gpt2")
    # A damaged install without the packaged copy: one line that says what to do.
    monkeypatch.delenv("DTL_GPT2_DIR")
    monkeypatch.setattr(tokenizer_module, "PACKAGED_GPT2_DIR", tmp_path / "gone")
    with pytest.raises(DtlError, match=r"missing from this installation.*reinstall dtl"):
        load_tokenizer("gpt2")


# tiktoken's pinned sha256 of OpenAI's files (tiktoken_ext/openai_public.py, encoding "gpt2").
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def _offline(monkeypatch, tmp_path) -> None:
    """No DTL_GPT2_DIR, an empty tiktoken cache, and any download attempt fails loudly."""
    monkeypatch.delenv("DTL_GPT2_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("the packaged GPT-2 tokenizer must not reach tiktoken's loader")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)


def test_packaged_gpt2_files_are_openais_with_their_licence():
    for name, digest in GPT2_SHA256.items():
        data = (tokenizer_module.PACKAGED_GPT2_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
    licence = (tokenizer_module.PACKAGED_GPT2_DIR / "LICENSE").read_text(encoding="utf-8")
    assert "Copyright (c) 2019 OpenAI" in licence and "Permission is hereby granted" in licence


def test_gpt2_works_out_of_the_box_with_no_cache_and_no_network(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    tok = load_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eos_id) == (50_257, 50_256)
    # Hand-checked GPT-2 ids (OpenAI's encoder.json): "Hello"=15496, " world"=995, " the"=262.
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.decode([15496, 995, 50256]) == "Hello world" + EOT_TEXT


def test_packaged_gpt2_equals_transformers_gpt2_tokenizer(
    monkeypatch, tmp_path, gpt2_dir, wiki_text
):
    transformers = pytest.importorskip("transformers")
    # The oracle: transformers' pure-Python port of GPT-2's encoder.py, on the shared copy.
    oracle = transformers.GPT2Tokenizer(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe"))
    _offline(monkeypatch, tmp_path)
    tok = load_tokenizer("gpt2")
    for text in (wiki_text[:30_000], " naïve café — 東京 🙂 it's we'll  \t\n  x", "Hello world"):
        assert tok.encode(text) == oracle.encode(text)


def test_cli_prepare_with_gpt2_needs_no_download(tmp_path):
    """A user's offline machine: `dtl prepare notes.txt` (default --tokenizer gpt2) just works."""
    notes = tmp_path / "notes.txt"
    notes.write_text("Hello world. " * 200, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DTL_GPT2_DIR"}
    env.update(HOME=str(tmp_path), TIKTOKEN_CACHE_DIR=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    # Any attempt at the network fails at once instead of waiting.
    env.update(https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    done = subprocess.run(
        [sys.executable, "-m", "dtl", "prepare", str(notes), "-o", str(tmp_path / "d"),
         "--max-length", "32", "--val-fraction", "0.1"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "tokenizer gpt2 (vocab 50,257" in done.stdout
    tokens = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert list(tokens[:4]) == [15496, 995, 13, 18435]  # "Hello", " world", ".", " Hello"


@pytest.mark.slow
def test_wheel_carries_the_gpt2_files(tmp_path):
    """A non-editable install gets the files too: they are in the built wheel (built from a
    clean copy of the sources, so no stale build/ folder can supply them)."""
    project = tmp_path / "project"
    shutil.copytree(
        PROJECT_ROOT / "src", project / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, project / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(project), "--no-deps",
         "--no-build-isolation", "-w", str(tmp_path / "dist"), "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("dtl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("encoder.json", "vocab.bpe", "LICENSE"):
        assert f"dtl/assets/gpt2/{name}" in names


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(DtlError, match="neither 'gpt2' nor a directory"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(DtlError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(DtlError, match="not a readable BPE vocabulary"):
        load_tokenizer(tmp_path)


def test_cli_tokenizer_train(tmp_path, capsys, wiki_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(wiki_text[:100_000], encoding="utf-8")
    code, out, _ = run_cli(
        ["tokenizer", "train", str(corpus), "--vocab-size", "600", "-o", str(tmp_path / "t")],
        capsys,
    )
    assert code == 0 and "600-token byte-level BPE" in out
    assert load_tokenizer(tmp_path / "t").vocab_size == 600
    code, _, err = run_cli(
        [
            "tokenizer",
            "train",
            str(tmp_path / "missing.txt"),
            "--vocab-size",
            "600",
            "-o",
            str(tmp_path / "u"),
        ],
        capsys,
    )
    assert (
        code == 2
        and err.strip() == f"dtl tokenizer: error: {tmp_path / 'missing.txt'}: no such file"
    )
    code, _, err = run_cli(
        ["tokenizer", "train", str(corpus), "--vocab-size", "100", "-o", str(tmp_path / "u")],
        capsys,
    )
    assert code == 2 and "--vocab-size 100 must be between 257" in err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    code, _, err = run_cli(
        ["tokenizer", "train", str(bad), "--vocab-size", "300", "-o", str(tmp_path / "v")], capsys
    )
    assert code == 2 and str(bad) in err and "UTF-8" in err
    assert not (tmp_path / "u").exists() and not (tmp_path / "v").exists()


def _tokenizer_train(*args, cwd=None) -> subprocess.CompletedProcess:
    """`dtl tokenizer train ARGS` as a user runs it (a real process: tracebacks show)."""
    return subprocess.run(
        [sys.executable, "-m", "dtl", "tokenizer", "train", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _one_error_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("dtl tokenizer: error: ")
    for needle in needles:
        assert needle in line, line


def test_tokenizer_train_on_tiny_text_writes_files_it_reads_back(tmp_path):
    """Too little text to repeat a pair: no merges at all, still a tokenizer that loads."""
    text = tmp_path / "ok.txt"
    text.write_text("hello world\n", encoding="utf-8")
    done = _tokenizer_train(text, "--vocab-size", 300, "-o", tmp_path / "tk")
    assert done.returncode == 0, done.stderr
    assert "only 257 of the 300 tokens" in done.stderr  # said, not hidden
    tok = load_tokenizer(tmp_path / "tk")
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    ids = tok.encode("hello world")
    assert (
        ids == [b + 0 for b in _gpt2_byte_ids("hello world")] and tok.decode(ids) == "hello world"
    )


def _gpt2_byte_ids(text: str) -> list[int]:
    """With no merges a byte-level BPE's ids are its 256-symbol alphabet, which the tokenizers
    library orders by GPT-2's printable stand-in characters (sorted)."""
    table = _bytes_to_unicode()
    order = sorted(table.values())
    return [order.index(table[b]) for b in text.encode("utf-8")]


def test_tokenizer_train_refuses_to_overwrite_without_force(tmp_path, wiki_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(wiki_text[:50_000], encoding="utf-8")
    assert _tokenizer_train(corpus, "--vocab-size", 400, "-o", tmp_path / "tk").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "tk").iterdir()}
    done = _tokenizer_train(corpus, "--vocab-size", 500, "-o", tmp_path / "tk")
    _one_error_line(done, "already holds a tokenizer", "--force")
    assert {p.name: p.read_bytes() for p in (tmp_path / "tk").iterdir()} == before
    # a folder holding anything else is refused even with --force: replacing it would delete
    # the user's files (here the corpus itself)
    (tmp_path / "notes").mkdir()
    shutil.copy(corpus, tmp_path / "notes" / "c.txt")
    for force in ([], ["--force"]):
        done = _tokenizer_train(
            tmp_path / "notes" / "c.txt", "--vocab-size", 500, "-o", tmp_path / "notes", *force
        )
        _one_error_line(done, "not a tokenizer's (c.txt)")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["c.txt"]
    # --force replaces the tokenizer, whole
    done = _tokenizer_train(corpus, "--vocab-size", 500, "-o", tmp_path / "tk", "--force")
    assert done.returncode == 0, done.stderr
    assert load_tokenizer(tmp_path / "tk").vocab_size == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "notes", "tk"]  # no temp dirs


def test_tokenizer_train_into_a_file_is_one_line(tmp_path):
    text = tmp_path / "ok.txt"
    text.write_text("hello world\n" * 20, encoding="utf-8")
    _one_error_line(_tokenizer_train(text, "--vocab-size", 300, "-o", text), "is a file")
    assert text.read_text() == "hello world\n" * 20


def test_tokenizer_train_into_the_working_directory(tmp_path, wiki_text):
    """`-o .`: the folder the shell is in is written into, never renamed away."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(wiki_text[:30_000], encoding="utf-8")
    here = tmp_path / "here"
    here.mkdir()
    for size, force in ((300, []), (280, ["--force"])):
        done = _tokenizer_train(corpus, "--vocab-size", size, "-o", ".", *force, cwd=here)
        assert done.returncode == 0, done.stderr
        assert load_tokenizer(here).vocab_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "here"]
