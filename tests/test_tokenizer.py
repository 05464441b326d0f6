"""dtl.tokenizer against independent implementations: the `tokenizers` library's BPE on the
same GPT-2 files, a from-scratch reference BPE (GPT-2's encoder.py algorithm), published ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit import WIKITEXT, gpt2_oracle, run_cli, shared_path

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
    # No directory anywhere and tiktoken cannot download (offline): the same advice.
    monkeypatch.delenv("DTL_GPT2_DIR")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(
        DtlError,
        match=r"not available offline.*--gpt2-dir DIR or the environment variable DTL_GPT2_DIR",
    ):
        load_tokenizer("gpt2")


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
