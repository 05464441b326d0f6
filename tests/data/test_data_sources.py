"""Sources -> records: WikiText, SQuAD, JSONL, text, Hugging Face names; their bad inputs."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from dtl.data.sources import detect_kind, detokenize_wikitext, iter_records
from dtl.errors import DtlError


def _raw_headings(path) -> list[str]:
    """Article titles by an independent reading: lines ' = Title = ' (one '=' each side)."""
    lines = path.read_bytes().decode("utf-8").split("\r\n")
    return [m.group(1) for ln in lines if (m := re.fullmatch(r" = ([^=].*?) = ", ln))]


def test_wikitext_articles_split_at_titles(wikitext_path):
    records = list(iter_records(wikitext_path, "wikitext"))
    titles = _raw_headings(wikitext_path)
    assert len(titles) == 62  # the README's count for this split
    assert [r["title"] for r in records] == titles
    first = records[0]
    assert first["title"] == "Robert Boulter"
    assert first["text"].startswith(
        "Robert Boulter is an English film , television and theatre actor ."
    )
    assert "Career" in first["sections"] and "\nCareer\n" in first["text"]
    assert all("\r" not in r["text"] and "\n\n" not in r["text"] for r in records)


def test_wikitext_lf_with_blank_lines_gives_the_same_records(wikitext_path, tmp_path):
    crlf = wikitext_path.read_bytes().decode("utf-8").split("\r\n")
    lf = tmp_path / "wiki.test.raw"
    lf.write_text(
        "\n".join(line for ln in crlf for line in (ln, "")), encoding="utf-8"
    )  # LF, blank lines
    assert list(iter_records(lf, "wikitext")) == list(iter_records(wikitext_path, "wikitext"))


def test_wikitext_tokens_variant_is_detokenized(tmp_path):
    path = tmp_path / "wiki.valid.tokens"
    path.write_text(
        " = Lost City = \n\n The ruins @-@ covered hill holds 1 @,@ 500 stones , weighing 3 @.@ 5 t ( each ) . "
        "It is n't small ! \n\n = = Name = = \n\n Named in 1911 . \n",
        encoding="utf-8",
    )
    (record,) = iter_records(path)  # kind from the name
    assert record["title"] == "Lost City"
    assert record["text"] == (
        "The ruins-covered hill holds 1,500 stones, weighing 3.5 t (each). It isn't small!\nName\nNamed in 1911."
    )
    assert detokenize_wikitext("a @-@ b , c") == "a-b, c"


def test_squad_pairs_carry_every_gold_answer(squad_path):
    data = json.loads(squad_path.read_text(encoding="utf-8"))
    gold = {qa["id"]: qa for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]}
    answerable = list(iter_records(squad_path, "squad"))
    assert len(answerable) == 293  # the README's counts: 293 answerable, 333 is_impossible
    for rec in answerable:
        qa = gold[rec["id"]]
        assert rec["question"] == qa["question"].strip()
        assert rec["answers"] == [a["text"] for a in qa["answers"]]
        assert rec["answer"] == qa["answers"][0]["text"].strip()
        assert rec["answer"] in rec["context"] and not rec["is_impossible"]
    everything = list(iter_records(squad_path, "squad", unanswerable="unanswerable"))
    impossible = [r for r in everything if r["is_impossible"]]
    assert len(everything) == 626 and len(impossible) == 333
    assert all(r["answer"] == "unanswerable" and r["answers"] == [] for r in impossible)


def test_squad_missing_fields_name_the_place(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "title": "T",
                        "paragraphs": [{"context": "c", "qas": [{"id": "1", "answers": []}]}],
                    }
                ]
            }
        )
    )
    with pytest.raises(
        DtlError, match=r"bad\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\] has no 'question' field"
    ):
        list(iter_records(path, "squad"))
    path.write_text('{"version": "v2.0", "data": [')
    with pytest.raises(DtlError, match=r"bad\.json: not valid JSON \(line 1"):
        list(iter_records(path, "squad"))
    path.write_text('{"version": "v2.0"}')
    with pytest.raises(DtlError, match="the top level has no 'data' field"):
        list(iter_records(path, "squad"))


def test_jsonl_with_renamed_fields(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"q": "Who?", "a": "Me", "src": "x"}\n\n{"q": "Why?", "a": "Because"}\n', encoding="utf-8"
    )
    records = list(iter_records(path, "jsonl", fields={"question": "q", "answer": "a"}))
    assert records == [
        {"question": "Who?", "answer": "Me", "src": "x"},
        {"question": "Why?", "answer": "Because"},
    ]
    path.write_text('{"text": "ok"}\n{"body": "no"}\n', encoding="utf-8")
    with pytest.raises(
        DtlError, match=r"line 2 has neither text nor question \+ answer \(fields: body\)"
    ):
        list(iter_records(path))
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DtlError, match="line 2 is not valid JSON"):
        list(iter_records(path))


def test_text_as_one_document_or_blank_line_blocks(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First para\nline two\n\n\nSecond para\n", encoding="utf-8")
    assert list(iter_records(path)) == [
        {"title": "notes", "text": "First para\nline two\n\n\nSecond para"}
    ]
    blocks = list(iter_records(path, "text", split="blank"))
    assert [b["text"] for b in blocks] == ["First para\nline two", "Second para"]


def test_bad_files(tmp_path):
    with pytest.raises(DtlError, match=r"missing\.txt: no such file"):
        list(iter_records(tmp_path / "missing.txt"))
    (tmp_path / "empty.raw").write_bytes(b"")
    with pytest.raises(DtlError, match=r"empty\.raw: the file is empty"):
        list(iter_records(tmp_path / "empty.raw"))
    (tmp_path / "latin.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(
        DtlError, match=r"latin\.txt: line 2 is not UTF-8 \(byte 0xe9 at column 4\)"
    ):
        list(iter_records(tmp_path / "latin.txt"))
    with pytest.raises(DtlError, match="is a directory"):
        list(iter_records(tmp_path))
    with pytest.raises(DtlError, match="unknown --kind 'csv'"):
        list(iter_records(tmp_path / "latin.txt", "csv"))


def test_detect_kind():
    names = {
        "enwiki-latest-pages-articles1.xml.bz2": "wikipedia",
        "export.xml": "wikipedia",
        "wiki.train.raw": "wikitext",
        "wiki.valid.tokens": "wikitext",
        "train-v2.0.json": "squad",
        "records.jsonl": "jsonl",
        "notes.md": "text",
        "hf:squad": "hf",
    }
    assert {n: detect_kind(n) for n in names} == names


def test_hugging_face_names_fail_offline_with_advice(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(
        DtlError, match=r"pip install 'dtl\[datasets\]'.*wiki\.train\.raw with --kind wikitext"
    ):
        list(iter_records("hf:wikitext-2"))
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'squad' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(
        DtlError,
        match=r"could not load hf:squad .*offline, pass local files instead: train-v1\.1\.json",
    ):
        list(iter_records("hf:squad"))
    with pytest.raises(DtlError, match="unknown dataset 'imdb'"):
        list(iter_records("hf:imdb"))


def test_hugging_face_rows_become_records(monkeypatch):
    """The hub's row layout (as the datasets library returns it) maps to our records."""
    rows = {
        ("wikitext", "wikitext-2-raw-v1"): [
            {"text": ""},
            {"text": " = Valkyria = \n"},
            {"text": " Senjō is a game . \n"},
            {"text": " = = Plot = = \n"},
            {"text": " It is war . \n"},
        ],
        ("squad_v2", None): [
            {
                "id": "a",
                "title": "T",
                "context": "Paris is in France.",
                "question": "Where is Paris? ",
                "answers": {"text": ["France", "in France"], "answer_start": [12, 9]},
            },
            {
                "id": "b",
                "title": "T",
                "context": "c",
                "question": "Who?",
                "answers": {"text": [], "answer_start": []},
            },
        ],
    }
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda repo, config, split: rows[(repo, config)]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (article,) = iter_records("hf:wikitext-2")
    assert article == {
        "title": "Valkyria",
        "text": "Senjō is a game .\nPlot\nIt is war .",
        "sections": ["Plot"],
    }
    (qa,) = iter_records("hf:squad_v2")
    assert (qa["question"], qa["answer"], qa["answers"]) == (
        "Where is Paris?",
        "France",
        ["France", "in France"],
    )
