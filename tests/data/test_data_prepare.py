"""dtl.data.prepare: shards, masks, the split, meta.json, atomic writes, bad inputs."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from data_helpers import run_cli

from dtl.data.loader import IGNORE_INDEX, TokenDataset, read_meta
from dtl.data.prepare import is_val, prepare
from dtl.data.shards import token_dtype
from dtl.data.sources import iter_records
from dtl.errors import DtlError
from dtl.tokenizer import load_tokenizer


def _oracle(gpt2_dir):
    """GPT-2 from the tokenizers library (not DTL's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    files = (str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe"))
    hf = Tokenizer(models.BPE.from_file(*files))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return hf


def test_pack_wikitext_shards_hold_every_document_once(gpt2, gpt2_dir, wikitext_path, tmp_path):
    summary = prepare(
        [wikitext_path], tmp_path / "d", max_length=128, val_fraction=0.1, progress=False
    )
    records = list(iter_records(wikitext_path, "wikitext"))
    oracle = _oracle(gpt2_dir)
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
    summary = prepare([path], tmp_path / "d", max_length=16, val_fraction=0.3, articles_as="both",
                      progress=False)  # fmt: skip
    assert summary["mode"] == "pack" and summary["split"] == "documents"
    assert summary["examples"] == 3 * len(names) and summary["qa_examples"] == 2 * len(names)
    text = {s: gpt2.decode(np.fromfile(tmp_path / "d" / f"{s}.bin", np.uint16).tolist())
            for s in ("train", "val")}  # fmt: skip
    for name in names:
        (split,) = [s for s in text if f"{name} is a town" in text[s]]  # the text: in one split
        assert (
            f"{name} is a town in the north.\nHistory\n{name} was founded in 1900.<|endoftext|>"
            f"Question: What is {name}?\nAnswer: {name} is a town in the north.<|endoftext|>"
            f"Question: What is the history of {name}?\nAnswer: {name} was founded in 1900."
            "<|endoftext|>"
        ) in text[split]
    assert all(text.values())


def test_split_is_seeded_and_by_document(gpt2, squad_path, tmp_path):
    a = prepare(
        [squad_path], tmp_path / "a", max_length=64, val_fraction=0.2, seed=1, progress=False
    )
    b = prepare(
        [squad_path], tmp_path / "b", max_length=64, val_fraction=0.2, seed=1, progress=False
    )
    c = prepare(
        [squad_path], tmp_path / "c", max_length=64, val_fraction=0.2, seed=2, progress=False
    )
    for name in ("train.bin", "val.bin", "train.idx", "val.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert a["val"] == b["val"] and a["val"] != c["val"]
    # No SQuAD paragraph (the document here) has questions in both splits.
    tok = load_tokenizer(tmp_path / "a")
    records = list(iter_records(squad_path, "squad"))
    split_of = {}
    for split in ("train", "val"):
        ds = TokenDataset(tmp_path / "a", split)
        for i in range(len(ds)):
            ids, _ = ds.row(i)
            question = tok.decode(ids.tolist()).removeprefix("Question: ").split("\nAnswer:")[0]
            context = next(r["context"] for r in records if r["question"] == question)
            assert split_of.setdefault(context, split) == split


def _one_document(wikitext_path, path, size=100_000):
    """A plain-prose file with no blank lines or headings: real WikiText paragraphs joined."""
    lines = []
    for line in wikitext_path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.strip().startswith("="):
            lines.append(line.strip())
        if sum(map(len, lines)) > size:
            break
    text = "\n".join(lines)
    path.write_text(text + "\n", encoding="utf-8")
    return text


def test_one_text_file_holds_out_its_last_tokens(gpt2_dir, gpt2, wikitext_path, tmp_path, capsys):
    text = _one_document(wikitext_path, tmp_path / "c.txt")
    code, out, err = run_cli(["prepare", tmp_path / "c.txt", "--kind", "text", "--pack",
                              "--max-length", "64", "--val-fraction", "0.1", "-o",
                              tmp_path / "d", "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    assert ("  split: the last 10% of each document's tokens went to val (1 document: too few "
            "to hold out whole documents)") in out.splitlines()  # fmt: skip
    assert out.startswith("prepared 1 example from 1 document in")
    expected = [*_oracle(gpt2_dir).encode(text).ids, 50256]
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16).tolist()
    # Every token in exactly one split: train the head, val the tail, both in order.
    assert len(train) + len(val) == len(expected) > 20_000
    assert train + val == expected
    assert len(val) == math.ceil(0.1 * len(expected))
    meta = read_meta(tmp_path / "d")
    assert (meta["split"], meta["documents"]) == ("tokens", 1)
    assert meta["train"]["documents"] == meta["val"]["documents"] == 1  # cut in two
    assert meta["val"]["rows"] == (len(val) - 1) // 64 > 0
    assert len(TokenDataset(tmp_path / "d", "val")) == meta["val"]["rows"]


def test_few_documents_split_within_each_and_val_gets_a_row(gpt2, tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text(
        '{"title": "a", "text": "First document."}\n{"title": "b", "text": "Second one."}\n'
    )
    first, second = gpt2.encode("First document.") + [50256], gpt2.encode("Second one.") + [50256]
    summary = prepare([path], tmp_path / "d", max_length=2, val_fraction=0.01, progress=False)
    # 8 tokens; val needs one row (3 tokens): 2 from the first document's tail, 1 from the
    # second's (in proportion to their sizes, 4 and 4, rounded cumulatively).
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16).tolist()
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16).tolist()
    assert train == first[:2] + second[:3] and val == first[2:] + second[3:]
    assert summary["split"] == "tokens" and summary["documents"] == 2
    assert (summary["train"]["documents"], summary["val"]["documents"]) == (2, 2)
    assert (summary["train"]["rows"], summary["val"]["rows"]) == (2, 1)
    # Too small for a train row and a val row: a clear error, nothing written.
    with pytest.raises(DtlError, match=r"two\.jsonl: 8 tokens, too few for a train row and a "
                       r"val row of max_length \+ 1 = 5 tokens each; add text or re-run "
                       r"`dtl prepare --max-length N` with a smaller N"):  # fmt: skip
        prepare([path], tmp_path / "e", max_length=4, val_fraction=0.01, progress=False)
    assert not (tmp_path / "e").exists()
    # val_fraction 0: no re-split and no error.
    summary = prepare([path], tmp_path / "z", max_length=4, val_fraction=0.0, progress=False)
    assert summary["split"] == "documents" and summary["val"]["tokens"] == 0


def test_pad_mode_holds_out_each_documents_last_examples(gpt2_dir, gpt2, tmp_path):
    # Two SQuAD-style paragraphs (the documents), 7 and 5 questions: held out whole, val
    # would get 0%, 58%, 42% or 100% of the examples, all far from 20%.
    pairs = [("A", f"What is a{i}?", f"alpha {i}") for i in range(7)]
    pairs += [("B", f"Who is b{i}?", f"beta {i}") for i in range(5)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a, "context": c}) + "\n"
                            for c, q, a in pairs))  # fmt: skip
    summary = prepare([path], tmp_path / "d", max_length=32, val_fraction=0.2,
                      answer_only_loss=True, progress=False)  # fmt: skip
    assert summary["mode"] == "pad" and summary["split"] == "examples"
    # 3 val examples (ceil(0.2 * 12)), spread 7:5 -> 2 and 1: each paragraph's last ones.
    want = {"train": pairs[0:5] + pairs[7:11], "val": pairs[5:7] + pairs[11:12]}
    oracle = _oracle(gpt2_dir)
    for split, rows in want.items():
        ds = TokenDataset(tmp_path / "d", split)
        assert len(ds) == summary[split]["examples"] == summary[split]["rows"] == len(rows)
        for i, (_, q, a) in enumerate(rows):
            ids, flags = ds.row(i)
            prompt = oracle.encode(f"Question: {q}\nAnswer:").ids
            assert ids.tolist() == [*prompt, *oracle.encode(f" {a}").ids, 50256]
            assert flags.tolist() == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    assert (summary["train"]["documents"], summary["val"]["documents"]) == (2, 2)
    # One example cannot make a train row and a val row.
    (tmp_path / "one.jsonl").write_text(json.dumps({"question": "Q?", "answer": "A"}) + "\n")
    with pytest.raises(
        DtlError,
        match=r"one\.jsonl: 1 example, too few for a train row and a "
        r"val row \(one example each\); add more examples",
    ):
        prepare([tmp_path / "one.jsonl"], tmp_path / "e", val_fraction=0.2, progress=False)
    assert not (tmp_path / "e").exists()


def test_dozens_of_documents_keep_whole_documents(gpt2, squad_path, tmp_path):
    # 87 SQuAD paragraphs at 5%: one paragraph (1.4% of the examples) lands in val. Far from
    # 5%, but a corpus of dozens of documents keeps the document split while val has a row.
    summary = prepare([squad_path], tmp_path / "d", max_length=64, progress=False)
    assert summary["split"] == "documents" and summary["split_reason"] is None
    assert summary["documents"] == summary["train"]["documents"] + summary["val"]["documents"]
    assert summary["documents"] >= 20 and 0 < summary["val"]["rows"]


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
