"""`dtl extract` and `dtl prepare` as a user runs them, good inputs and bad."""

from __future__ import annotations

import json

import pytest
from data_helpers import run_cli

from dtl.data.loader import read_meta


@pytest.fixture
def cli(capsys, gpt2):  # gpt2 sets DTL_GPT2_DIR
    return lambda *argv: run_cli([str(a) for a in argv], capsys)


def test_extract_wikitext_and_squad(cli, wikitext_path, squad_path, tmp_path):
    code, out, _ = cli("extract", wikitext_path, "-o", tmp_path / "wt.jsonl")
    assert code == 0 and out.startswith("62 records (wikitext)")
    lines = (tmp_path / "wt.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 62 and json.loads(lines[0])["title"] == "Robert Boulter"
    code, out, _ = cli(
        "extract", squad_path, "-o", tmp_path / "sq.jsonl", "--unanswerable", "unanswerable"
    )
    assert code == 0 and out.startswith("626 records (squad)")


def test_extract_then_prepare_records(cli, wikitext_path, tmp_path):
    cli("extract", wikitext_path, "-o", tmp_path / "wt.jsonl")
    code, out, _ = cli(
        "prepare",
        tmp_path / "wt.jsonl",
        "-o",
        tmp_path / "d",
        "--max-length",
        "64",
        "--preset",
        "tiny",
    )
    assert code == 0, out
    meta = read_meta(tmp_path / "d")
    assert out.splitlines()[0] == (
        f"prepared 62 examples from 62 documents in {meta['seconds']:.1f}s -> {tmp_path / 'd'}"
    )
    assert (
        f"train: {meta['train']['documents']} documents, {meta['train']['tokens']:,} tokens" in out
    )
    assert meta["mode"] == "pack" and meta["max_length"] == 64


def test_prepare_squad_defaults_to_padded_rows(cli, squad_path, tmp_path):
    code, out, _ = cli(
        "prepare", squad_path, "-o", tmp_path / "q", "--answer-only-loss", "--preset", "qa"
    )
    assert code == 0
    meta = read_meta(tmp_path / "q")
    assert (meta["mode"], meta["max_length"], meta["loss_mask"]) == ("pad", 1024, True)
    assert "answer-only loss" in out


def _error(cli, *argv) -> str:
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err  # one clear line
    return err.strip()


def test_bad_inputs_give_one_line_and_leave_nothing(cli, tmp_path, enwiki_path, wikitext_path):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "cut.xml.bz2").write_bytes(enwiki_path.read_bytes()[:300_000])
    (tmp_path / "bad.xml").write_text("<mediawiki><page><title>x</title></mediawiki>")
    (tmp_path / "latin.txt").write_bytes("na\xefve\n".encode("latin-1"))
    (tmp_path / "q.json").write_text(
        json.dumps({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]})
    )
    cases = {
        ("prepare", tmp_path / "missing.txt"): "missing.txt: no such file",
        ("prepare", tmp_path / "empty.txt"): "empty.txt: the file is empty",
        (
            "prepare",
            tmp_path / "cut.xml.bz2",
        ): "cut.xml.bz2: the .bz2 stream ends early (truncated download?)",
        ("prepare", tmp_path / "bad.xml"): "bad.xml: invalid XML at line 1",
        (
            "prepare",
            tmp_path / "latin.txt",
        ): "latin.txt: line 1 is not UTF-8 (byte 0xef at column 3)",
        ("prepare", tmp_path / "q.json"): "q.json: data[0].paragraphs[0] has no 'context' field",
        ("extract", tmp_path / "cut.xml.bz2"): "cut.xml.bz2: the .bz2 stream ends early",
        ("extract", tmp_path / "latin.txt"): "latin.txt: line 1 is not UTF-8",
    }
    for (verb, path), message in cases.items():
        err = _error(cli, verb, path, "-o", out if verb == "prepare" else tmp_path / "r.jsonl")
        assert err.startswith(f"dtl {verb}: error: ") and message in err, err
    err = _error(
        cli, "prepare", wikitext_path, "-o", out, "--preset", "tiny", "--max-length", "512"
    )
    assert "--max-length 512 is over the model's limit of 256 tokens" in err
    err = _error(cli, "prepare", wikitext_path, "-o", out, "--val-fraction", "1.5")
    assert "--val-fraction 1.5 must be in [0, 1)" in err
    err = _error(cli, "prepare", wikitext_path, "-o", out, "--tokenizer", tmp_path / "no-tok")
    assert "is neither 'gpt2' nor a directory" in err
    # Nothing half-written anywhere: no data dir, no records file, no temp folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.xml",
        "cut.xml.bz2",
        "empty.txt",
        "latin.txt",
        "q.json",
    ]


def test_a_file_too_small_for_a_train_and_a_val_row(cli, tmp_path):
    (tmp_path / "tiny.txt").write_text("Hello there, world.\n")
    err = _error(cli, "prepare", tmp_path / "tiny.txt", "-o", tmp_path / "d", "--max-length", "8")
    assert err.startswith("dtl prepare: error: "), err
    assert (
        "tiny.txt: 6 tokens, too few for a train row and a val row of max_length + 1 = 9 tokens "
        "each; add text or re-run `dtl prepare --max-length N` with a smaller N" in err
    ), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]


def test_prepare_a_dump_and_squad_together(cli, tmp_path):
    """Each input gets its own kind's options: the dump's --processes and
    --keep-disambiguation must not reach the SQuAD reader (that was a TypeError)."""
    from dtl.corpus import corpus_files

    dump, squad = corpus_files()
    code, out, err = cli(
        "prepare", dump, squad, "-o", tmp_path / "d", "--max-length", "64", "--processes", "1"
    )
    assert code == 0, err
    meta = read_meta(tmp_path / "d")
    assert sorted(s["kind"] for s in meta["sources"]) == ["squad", "wikipedia"]
