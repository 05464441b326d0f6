"""dtl.data.prepare: shards, masks, meta.json, atomic writes, bad inputs (the split: test_data_split)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from testkit import gpt2_oracle

from dtl.data.loader import IGNORE_INDEX, TokenDataset, read_meta
from dtl.data.prepare import prepare
from dtl.data.shards import token_dtype
from dtl.data.sources import iter_records
from dtl.data.split import is_val
from dtl.errors import DtlError
from dtl.tokenizer import load_tokenizer


def test_pack_wikitext_shards_hold_every_document_once(gpt2, gpt2_dir, wikitext_path, tmp_path):
    summary = prepare(
        [wikitext_path], tmp_path / "d", max_length=128, val_fraction=0.1, progress=False
    )
    records = list(iter_records(wikitext_path, "wikitext"))
    oracle = gpt2_oracle(gpt2_dir)
    meta = read_meta(tmp_path / "d")
    assert meta["mode"] == "pack" and meta["dtype"] == "uint16" and meta["tokenizer"] == "gpt2"
    assert meta["split"] == "documents" and meta["documents"] == len(records) == 62
    assert meta["sources"][0]["sha256"] == hashlib.sha256(wikitext_path.read_bytes()).hexdigest()
    # Each split is its documents' ids, each followed by end-of-text, in file order.
    for split in ("train", "val"):
        docs = [
            r
            for i, r in enumerate(records)
            if is_val(f"{r['title']}#{i}", 0, 0.1) == (split == "val")
        ]
        expected = [t for r in docs for t in (*oracle.encode(r["text"]).ids, 50256)]
        tokens = np.fromfile(tmp_path / "d" / f"{split}.bin", dtype=np.uint16)
        assert tokens.tolist() == expected
        assert summary[split]["documents"] == len(docs) and summary[split]["tokens"] == len(
            expected
        )
        assert summary[split]["rows"] == (len(expected) - 1) // 128
    assert 0 < summary["val"]["documents"] < summary["train"]["documents"]
    assert (
        load_tokenizer(tmp_path / "d").name == "gpt2"
    )  # the tokenizer's files are in the data dir


def test_pad_squad_rows_and_answer_only_loss(gpt2, squad_path, tmp_path):
    prepare([squad_path], tmp_path / "qa", max_length=64, answer_only_loss=True, progress=False)
    prepare([squad_path], tmp_path / "full", max_length=64, progress=False)
    records = {r["question"]: r for r in iter_records(squad_path, "squad")}
    qa = TokenDataset(tmp_path / "qa", "train")
    full = TokenDataset(tmp_path / "full", "train")
    assert qa.mode == "pad" and len(qa) == len(full) > 250
    for i in (0, 7, len(qa) - 1):
        row, row_full = qa[i], full[i]
        n = int(row["attention_mask"].sum())
        text = gpt2.decode(row["input_ids"][:n].tolist())
        question = text.removeprefix("Question: ").split("\nAnswer:")[0]
        answer = records[question]["answer"]
        assert text == f"Question: {question}\nAnswer: {answer}"
        assert row["attention_mask"][n:].eq(0).all() and row["targets"][n:].eq(IGNORE_INDEX).all()
        scored = row["targets"][row["targets"] != IGNORE_INDEX].tolist()
        assert gpt2.decode(scored) == f" {answer}<|endoftext|>"  # answer + the end-of-text token
        targets = row_full["targets"][:n].tolist()
        assert gpt2.decode(targets) == text[len("Question") :] + "<|endoftext|>"


def test_articles_as_qa(gpt2, enwiki_path, tmp_path):
    summary = prepare([enwiki_path], tmp_path / "w", articles_as="qa", progress=False)
    assert summary["mode"] == "pad" and summary["qa_examples"] == summary["examples"] > 300
    assert summary["extract"]["disambiguation"] == 8
    row = TokenDataset(tmp_path / "w", "train")[0]
    n = int(row["attention_mask"].sum())
    assert gpt2.decode(row["input_ids"][:n].tolist()).startswith(
        "Question: What is Anarchism?\nAnswer: Anarchism is"
    )


def test_articles_as_both_keeps_an_articles_text_and_pairs_in_one_split(gpt2, tmp_path):
    path = tmp_path / "articles.jsonl"
    names = [f"Place{chr(65 + i)}{chr(65 + j)}" for i in range(6) for j in range(5)]  # 30 articles
    with open(path, "w") as f:
        for name in names:
            text = f"{name} is a town in the north.\nHistory\n{name} was founded in 1900."
            f.write(json.dumps({"title": name, "text": text, "sections": ["History"]}) + "\n")
    summary = prepare(
        [path], tmp_path / "d", max_length=16, val_fraction=0.3, articles_as="both", progress=False
    )
    assert summary["mode"] == "pack" and summary["split"] == "documents"
    assert summary["examples"] == 3 * len(names) and summary["qa_examples"] == 2 * len(names)
    tokens = {s: np.fromfile(tmp_path / "d" / f"{s}.bin", np.uint16) for s in ("train", "val")}
    text = {s: gpt2.decode(ids.tolist()) for s, ids in tokens.items()}
    for name in names:
        (split,) = [s for s in text if f"{name} is a town" in text[s]]  # the text: in one split
        assert (
            f"{name} is a town in the north.\nHistory\n{name} was founded in 1900.<|endoftext|>"
            f"Question: What is {name}?\nAnswer: {name} is a town in the north.<|endoftext|>"
            f"Question: What is the history of {name}?\nAnswer: {name} was founded in 1900."
            "<|endoftext|>"
        ) in text[split]
    assert all(text.values())


def test_token_dtype_boundary():
    assert token_dtype(50_257) == np.uint16 and token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint32 and token_dtype(100_277) == np.uint32


def test_max_length_over_the_model_limit(gpt2, wikitext_path, tmp_path):
    with pytest.raises(
        DtlError, match=r"--max-length 2048 is over the model's limit of 1024 tokens"
    ):
        prepare(
            [wikitext_path], tmp_path / "d", max_length=2048, model_max_length=1024, progress=False
        )
    with pytest.raises(DtlError, match=r"--max-length 0 must be an integer"):
        prepare([wikitext_path], tmp_path / "d", max_length=0, progress=False)
    assert not (tmp_path / "d").exists()


def test_a_failure_leaves_no_half_written_dir(gpt2, wikitext_path, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n" * 1000 + b"\xff\xfe broken\n")
    out = tmp_path / "d"
    with pytest.raises(DtlError, match=r"bad\.txt: line 1001 is not UTF-8"):
        prepare([wikitext_path, bad], out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]
    # An existing data dir survives a failed re-run unchanged.
    prepare([wikitext_path], out, max_length=64, progress=False)
    before = (out / "train.bin").read_bytes()
    with pytest.raises(DtlError):
        prepare([bad], out, progress=False)
    assert (out / "train.bin").read_bytes() == before and json.loads(
        (out / "meta.json").read_text()
    )["max_length"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "d"]


def test_refuses_to_overwrite_a_folder_that_is_not_a_data_dir(gpt2, wikitext_path, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DtlError, match="refusing to overwrite"):
        prepare([wikitext_path], tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_missing_and_empty_inputs(gpt2, tmp_path):
    with pytest.raises(DtlError, match=r"nope\.txt: no such file"):
        prepare([tmp_path / "nope.txt"], tmp_path / "d", progress=False)
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DtlError, match="no documents or Q&A pairs came out of"):
        prepare([tmp_path / "e.jsonl"], tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("answer_only_loss", [False, True])
def test_pack_qa_rows_end_each_answer_with_a_counted_end_of_text(
    gpt2, gpt2_dir, tmp_path, answer_only_loss
):
    """Hand-built: two Q&A records packed into rows of 8 tokens. Each answer is followed by
    end-of-text (50256), and that token is a loss target, so a model learns to stop."""
    pairs = [("Who wrote Hamlet?", "William Shakespeare"), ("What is two plus two?", "Four")]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    prepare([path], tmp_path / "d", mode="pack", max_length=8, val_fraction=0.0,
            answer_only_loss=answer_only_loss, progress=False)  # fmt: skip
    oracle = gpt2_oracle(gpt2_dir)
    heads = [oracle.encode(f"Question: {q}\nAnswer:").ids for q, _ in pairs]
    stream, scored = [], []
    for head, (_, answer) in zip(heads, pairs, strict=True):
        rest = [*oracle.encode(f" {answer}").ids, 50256]
        stream += head + rest
        scored += [not answer_only_loss] * len(head) + [True] * len(rest)
    data = TokenDataset(tmp_path / "d", "train", seq_len=8)
    assert len(data) == (len(stream) - 1) // 8 >= 2
    for i in range(len(data)):
        window = slice(i * 8 + 1, i * 8 + 9)  # a row's targets: the next 8 tokens
        want = [t if ok else IGNORE_INDEX for t, ok in zip(stream[window], scored[window],
                                                          strict=True)]  # fmt: skip
        assert data[i]["targets"].tolist() == want
    # the first answer's end-of-text is inside the rows and is a target
    first_eos = stream.index(50256)
    assert first_eos <= 8 * len(data)
    row, col = divmod(first_eos - 1, 8)
    assert data[row]["targets"][col] == 50256


def test_python_prepare_defaults_to_the_length_dtl_train_assumes(gpt2, tmp_path):
    """`prepare()` with no max_length makes rows `dtl train`'s default model holds (issue 20.1):
    the tiny preset's context, 256 tokens, as `dtl prepare` does (it was 512 here)."""
    from dtl import ModelConfig

    path = tmp_path / "notes.txt"
    notes = [f"Note {i}: the river by town {i} floods every spring." for i in range(600)]
    path.write_text("\n\n".join(notes), encoding="utf-8")
    summary = prepare([path], tmp_path / "d", progress=False)
    assert summary["max_length"] == ModelConfig.preset("tiny").max_seq_length == 256
    assert read_meta(tmp_path / "d")["max_length"] == 256
