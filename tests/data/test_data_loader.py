"""BatchLoader: pairs, determinism, exact resume, ranks, epochs; TokenDataset on uint32 shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dtl.data.loader import IGNORE_INDEX, BatchLoader, TokenDataset, read_meta
from dtl.data.prepare import prepare
from dtl.errors import DtlError


@pytest.fixture(scope="module")
def packed(tmp_path_factory, wikitext_path, gpt2_dir):
    import os

    os.environ.setdefault("DTL_GPT2_DIR", str(gpt2_dir))
    out = tmp_path_factory.mktemp("packed") / "d"
    prepare(
        [wikitext_path], out, tokenizer="gpt2", gpt2_dir=gpt2_dir, max_length=32, progress=False
    )
    return out


@pytest.fixture(scope="module")
def gpt2_dir():
    from data_helpers import shared_path

    return shared_path("gpt2")


def _take(loader: BatchLoader, n: int) -> list[dict]:
    return [loader.next_batch() for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_pairs_are_the_stream_shifted_by_one(packed):
    tokens = np.fromfile(packed / "train.bin", dtype=np.uint16).astype(np.int64)
    ds = TokenDataset(packed, "train")
    assert len(ds) == (len(tokens) - 1) // 32
    for i in (0, 5, len(ds) - 1):
        row = ds[i]
        assert row["input_ids"].tolist() == tokens[i * 32 : i * 32 + 32].tolist()
        assert row["targets"].tolist() == tokens[i * 32 + 1 : i * 32 + 33].tolist()
        assert row["attention_mask"].eq(1).all()
    batch = BatchLoader(packed, "train", batch_size=4).next_batch()
    assert {k: tuple(v.shape) for k, v in batch.items()} == dict.fromkeys(batch, (4, 32))
    assert all(v.dtype == torch.long for v in batch.values())


def test_deterministic_given_the_seed(packed):
    a, b = BatchLoader(packed, "train", 4, seed=3), BatchLoader(packed, "train", 4, seed=3)
    c = BatchLoader(packed, "train", 4, seed=4)
    first, second, other = _take(a, 5), _take(b, 5), _take(c, 5)
    assert _same(first, second) and not _same(first, other)


def test_resume_gives_the_batch_an_unbroken_run_sees(packed):
    unbroken = BatchLoader(packed, "train", 8, seed=0)
    per_epoch = unbroken.batches_per_epoch
    stream = _take(unbroken, per_epoch + 5)  # crosses into the second epoch
    for stop in (3, per_epoch - 1, per_epoch + 2):
        run = BatchLoader(packed, "train", 8, seed=0)
        _take(run, stop)
        state = json.loads(json.dumps(run.state_dict()))  # as saved in a checkpoint
        resumed = BatchLoader(packed, "train", 8, seed=0)
        resumed.load_state_dict(state)
        assert _same(_take(resumed, 3), stream[stop : stop + 3])
    with pytest.raises(DtlError, match="cannot resume the data loader: saved global_batch=8"):
        BatchLoader(packed, "train", 4, seed=0).load_state_dict(state)


def test_two_ranks_see_what_one_process_with_twice_the_batch_sees(packed):
    single = _take(BatchLoader(packed, "train", 8, seed=1), 4)
    rank0 = _take(BatchLoader(packed, "train", 4, seed=1, rank=0, world_size=2), 4)
    rank1 = _take(BatchLoader(packed, "train", 4, seed=1, rank=1, world_size=2), 4)
    for s, r0, r1 in zip(single, rank0, rank1, strict=True):
        for key in s:
            assert torch.equal(s[key], torch.cat([r0[key], r1[key]]))


def test_an_epoch_visits_each_row_once(packed):
    from collections import Counter

    ds = TokenDataset(packed, "train")
    loader = BatchLoader(packed, "train", 16, seed=0)
    rows = Counter(tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds)))
    seen = Counter(
        tuple(row.tolist())
        for _ in range(loader.batches_per_epoch)
        for row in loader.next_batch()["input_ids"]
    )
    # Every row at most as often as it is in the split (identical windows exist), and the
    # epoch drops fewer than one batch of rows.
    assert all(rows[row] >= n for row, n in seen.items())
    assert seen.total() == loader.batches_per_epoch * 16 > len(ds) - 16
    assert loader.state_dict()["epoch"] == 1


def test_val_in_fixed_order_and_small_splits_repeat(packed):
    ds = TokenDataset(packed, "val")
    loader = BatchLoader(packed, "val", batch_size=len(ds) + 3, shuffle=False)
    batch = loader.next_batch()
    expected = [ds[i % len(ds)]["input_ids"] for i in range(len(ds) + 3)]
    assert torch.equal(batch["input_ids"], torch.stack(expected))
    assert loader.batches_per_epoch == 1


def test_uint32_shards_with_a_loss_mask(tmp_path):
    """A vocabulary over 65,535 stores uint32 ids; the mask hides non-target tokens."""
    ids = np.array([70_000, 5, 65_536, 99_999, 1, 2, 3], dtype=np.uint32)
    ids.tofile(tmp_path / "train.bin")
    np.array([1, 0, 0, 1, 1, 1, 1], dtype=np.uint8).tofile(tmp_path / "train.mask")
    np.array([0, 4, 7], dtype=np.uint64).tofile(tmp_path / "train.idx")
    meta = {
        "tokenizer": "x",
        "vocab_size": 100_000,
        "mode": "pad",
        "max_length": 4,
        "dtype": "uint32",
        "loss_mask": True,
        "eos_id": 99_999,
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ds = TokenDataset(tmp_path, "train")
    first, second = ds[0], ds[1]
    assert first["input_ids"].tolist() == [70_000, 5, 65_536, 99_999]
    assert first["targets"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 99_999, IGNORE_INDEX]
    assert first["attention_mask"].tolist() == [1, 1, 1, 0]
    assert second["input_ids"].tolist()[:2] == [1, 2] and second["targets"].tolist() == [
        2,
        3,
        IGNORE_INDEX,
        IGNORE_INDEX,
    ]


def test_not_a_data_dir(tmp_path):
    with pytest.raises(
        DtlError, match=r"is not a prepared data dir \(no meta\.json\); run dtl prepare"
    ):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(
        '{"tokenizer": "gpt2", "vocab_size": 5, "mode": "pack", "max_length": 8, "dtype": "uint16"}'
    )
    with pytest.raises(DtlError, match=r"train\.bin is missing; the data dir is incomplete"):
        BatchLoader(tmp_path, "train", 2)
    (tmp_path / "train.bin").write_bytes(np.arange(5, dtype=np.uint16).tobytes())
    with pytest.raises(DtlError, match=r"has 5 tokens, fewer than max_length \+ 1 = 9"):
        BatchLoader(tmp_path, "train", 2)
    with pytest.raises(DtlError, match="unknown split 'test'"):
        TokenDataset(tmp_path, "test")
