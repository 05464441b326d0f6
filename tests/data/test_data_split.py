"""dtl.data.split: the seeded split by document, and the split within too few documents."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from testkit import gpt2_oracle, run_cli

from dtl.data.loader import TokenDataset, read_meta
from dtl.data.prepare import prepare
from dtl.data.sources import iter_records
from dtl.data.split import _allocate, is_val
from dtl.errors import DtlError
from dtl.tokenizer import load_tokenizer


def test_is_val_is_a_seeded_hash_of_the_key():
    keys = [f"doc{i}" for i in range(4000)]
    held = [k for k in keys if is_val(k, 0, 0.1)]
    assert held == [k for k in keys if is_val(k, 0, 0.1)]  # the same every time
    assert 0.08 < len(held) / len(keys) < 0.12
    assert held != [k for k in keys if is_val(k, 1, 0.1)]  # another seed, another split
    # A larger fraction holds out a superset: each key's hash is fixed, the bar moves.
    assert set(held) <= {k for k in keys if is_val(k, 0, 0.3)}
    assert not any(is_val(k, 0, 0.0) for k in keys)


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=50), st.data())
def test_allocate_splits_a_target_in_proportion_exactly(sizes, data):
    target = data.draw(st.integers(0, sum(sizes)))
    parts = _allocate(target, sizes) if sum(sizes) else [0] * len(sizes)
    assert sum(parts) == target
    assert all(0 <= part <= size for part, size in zip(parts, sizes, strict=True))
    for part, size in zip(parts, sizes, strict=True):  # each within one of its exact share
        assert abs(part - target * size / max(sum(sizes), 1)) <= 1


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
    flags = ["--kind", "text", "--pack", "--max-length", 64, "--val-fraction", 0.1]
    code, out, err = run_cli(
        ["prepare", tmp_path / "c.txt", *flags, "-o", tmp_path / "d", "--no-progress"], capsys
    )
    assert code == 0, err
    split_line = (
        "  split: the last 10% of each document's tokens went to val (1 document: too few "
        "to hold out whole documents)"
    )
    assert split_line in out.splitlines()
    assert out.startswith("prepared 1 example from 1 document in")
    expected = [*gpt2_oracle(gpt2_dir).encode(text).ids, 50256]
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
    too_small = (
        r"two\.jsonl: 8 tokens, too few for a train row and a val row of max_length \+ 1 = 5 "
        r"tokens each; add text or re-run `dtl prepare --max-length N` with a smaller N"
    )
    with pytest.raises(DtlError, match=too_small):
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
    lines = [json.dumps({"question": q, "answer": a, "context": c}) for c, q, a in pairs]
    path.write_text("\n".join(lines) + "\n")
    summary = prepare(
        [path],
        tmp_path / "d",
        max_length=32,
        val_fraction=0.2,
        answer_only_loss=True,
        progress=False,
    )
    assert summary["mode"] == "pad" and summary["split"] == "examples"
    # 3 val examples (ceil(0.2 * 12)), spread 7:5 -> 2 and 1: each paragraph's last ones.
    want = {"train": pairs[0:5] + pairs[7:11], "val": pairs[5:7] + pairs[11:12]}
    oracle = gpt2_oracle(gpt2_dir)
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
