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


def _pad_split(path, ids, offsets, max_length, dtype="uint16", mask=None, **meta):
    """A hand-made pad-mode train split: the examples are ids[offsets[i]:offsets[i + 1]]."""
    np.array(ids, dtype=dtype).tofile(path / "train.bin")
    np.array(offsets, dtype=np.uint64).tofile(path / "train.idx")
    if mask is not None:
        np.array(mask, dtype=np.uint8).tofile(path / "train.mask")
    meta = {
        "tokenizer": "x",
        "vocab_size": max(ids) + 1,
        "mode": "pad",
        "max_length": max_length,
        "dtype": dtype,
        "loss_mask": mask is not None,
        **meta,
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_uint32_shards_with_a_loss_mask(tmp_path):
    """A vocabulary over 65,535 stores uint32 ids; the mask hides non-target tokens."""
    ids = [70_000, 5, 65_536, 99_999, 1, 2, 3]
    _pad_split(
        tmp_path,
        ids,
        [0, 4, 7],
        max_length=4,
        dtype="uint32",
        mask=[1, 0, 0, 1, 1, 1, 1],
        eos_id=99_999,
    )
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


def test_seq_len_reads_the_first_tokens_of_the_same_rows(packed):
    """A shorter seq_len cuts each row of max_length 32: same rows, same order, same resume."""
    tokens = np.fromfile(packed / "train.bin", dtype=np.uint16).astype(np.int64)
    ds = TokenDataset(packed, "train", seq_len=20)
    assert len(ds) == (len(tokens) - 1) // 32  # rows still start every 32 tokens
    for i in (0, 5, len(ds) - 1):
        row = ds[i]
        assert row["input_ids"].tolist() == tokens[i * 32 : i * 32 + 20].tolist()
        assert row["targets"].tolist() == tokens[i * 32 + 1 : i * 32 + 21].tolist()
    full = BatchLoader(packed, "train", 4, seed=2)
    cut = BatchLoader(packed, "train", 4, seed=2, seq_len=20)
    for _ in range(3):
        whole, short = full.next_batch(), cut.next_batch()
        assert {k: tuple(v.shape) for k, v in short.items()} == dict.fromkeys(short, (4, 20))
        for key in whole:
            assert torch.equal(short[key], whole[key][:, :20])
    assert cut.state_dict() == full.state_dict()  # what a checkpoint holds does not change


def test_seq_len_cuts_padded_rows_and_their_masks(tmp_path):
    # Two examples, [10, 11, 12, 13, 14] and [20, 21], in rows of 4.
    data = _pad_split(tmp_path, [10, 11, 12, 13, 14, 20, 21], [0, 5, 7], max_length=4, eos_id=0)
    first, second = TokenDataset(data, "train", seq_len=3)[0], TokenDataset(data, "train", 3)[1]
    # Example 1 is cut to 3 + 1 tokens: inputs 10 11 12, targets 11 12 13.
    assert first["input_ids"].tolist() == [10, 11, 12]
    assert first["targets"].tolist() == [11, 12, 13]
    assert first["attention_mask"].tolist() == [1, 1, 1]
    # Example 2 is shorter than the row: padded with eos (0), targets ignored.
    assert second["input_ids"].tolist() == [20, 0, 0]
    assert second["targets"].tolist() == [21, IGNORE_INDEX, IGNORE_INDEX]
    assert second["attention_mask"].tolist() == [1, 0, 0]
    for seq_len in (0, 5):
        with pytest.raises(DtlError, match=rf"seq_len {seq_len} must be in 1\.\.4"):
            TokenDataset(data, "train", seq_len=seq_len)


# ---------------------------------------------------------------------- offsets (issue 23)
def _positions(tmp_path, n_tokens: int = 203, max_length: int = 8):
    """A packed train split whose token i is i: every row names the positions it read."""
    data = tmp_path / "positions"
    data.mkdir()
    meta = {"tokenizer": "none", "vocab_size": 65536, "mode": "pack", "max_length": max_length,
            "dtype": "uint16"}  # fmt: skip
    (data / "meta.json").write_text(json.dumps(meta))
    np.arange(n_tokens, dtype=np.uint16).tofile(data / "train.bin")
    return data


def _epochs(loader: BatchLoader, n: int) -> list[list[dict]]:
    return [_take(loader, loader.batches_per_epoch) for _ in range(n)]


def test_offsets_move_the_rows_of_later_epochs_and_reach_every_token(tmp_path):
    data = _positions(tmp_path)  # 203 tokens, rows of 8: 25 rows reach tokens 0..200 only
    plain = BatchLoader(data, "train", batch_size=5, seed=0)
    moved = BatchLoader(data, "train", batch_size=5, seed=0, offsets=True)
    plain_epochs, moved_epochs = _epochs(plain, 40), _epochs(moved, 40)
    # The first pass is the one a run without offsets sees: a single-pass run is unchanged.
    assert _same(moved_epochs[0], plain_epochs[0])
    seen_plain, seen_moved, offsets = set(), set(), set()
    for a, b in zip(plain_epochs, moved_epochs, strict=True):
        starts_plain = {int(s) for batch in a for s in batch["input_ids"][:, 0]}
        starts = {int(s) for batch in b for s in batch["input_ids"][:, 0]}
        assert {s % 8 for s in starts_plain} == {0}
        assert len({s % 8 for s in starts}) == 1  # one offset per epoch, whole rows after it
        offsets |= {s % 8 for s in starts}
        for batch in b:  # every row is a window of the stream: targets = inputs + 1
            assert torch.equal(batch["targets"], batch["input_ids"] + 1)
            assert (batch["input_ids"][:, 1:] - batch["input_ids"][:, :-1]).eq(1).all()
            assert int(batch["targets"].max()) <= 202
        seen_plain |= {
            int(t) for batch in a for k in ("input_ids", "targets") for t in batch[k].flatten()
        }
        seen_moved |= {
            int(t) for batch in b for k in ("input_ids", "targets") for t in batch[k].flatten()
        }
    assert len(offsets) > 3  # the offset is drawn anew each epoch
    assert seen_plain == set(range(201))  # the data's rows never read the last 2 tokens
    assert seen_moved == set(range(203))  # offsets reach every token


def test_offsets_are_deterministic_from_the_seed(tmp_path):
    data = _positions(tmp_path)
    a = _epochs(BatchLoader(data, "train", 5, seed=3, offsets=True), 4)
    b = _epochs(BatchLoader(data, "train", 5, seed=3, offsets=True), 4)
    c = _epochs(BatchLoader(data, "train", 5, seed=4, offsets=True), 4)
    flat = [x for epoch in a for x in epoch]
    assert _same(flat, [x for epoch in b for x in epoch])
    assert not _same(flat, [x for epoch in c for x in epoch])
    # The offsets themselves come from (seed, epoch): seed 3's epoch 1 is not seed 4's.
    starts = [{int(s) % 8 for x in run[1] for s in x["input_ids"][:, 0]} for run in (a, c)]
    assert starts[0] != starts[1]


def test_offsets_resume_exactly_and_a_resume_keeps_the_saved_order(tmp_path):
    data = _positions(tmp_path)
    unbroken = BatchLoader(data, "train", 5, seed=1, offsets=True)
    per_epoch = unbroken.batches_per_epoch
    stream = _take(unbroken, 4 * per_epoch)
    for stop in (2, per_epoch, 2 * per_epoch + 3):
        run = BatchLoader(data, "train", 5, seed=1, offsets=True)
        _take(run, stop)
        state = json.loads(json.dumps(run.state_dict()))  # as saved in a checkpoint
        # Built as this launch would choose (no offsets): the saved run's order wins.
        resumed = BatchLoader(data, "train", 5, seed=1, offsets=False)
        resumed.load_state_dict(state)
        assert _same(_take(resumed, per_epoch), stream[stop : stop + per_epoch])
    # A checkpoint from before offsets existed resumes in the data's rows.
    old = {k: v for k, v in BatchLoader(data, "train", 5, seed=1).state_dict().items()
           if k != "offsets"}  # fmt: skip
    later = BatchLoader(data, "train", 5, seed=1, offsets=True)
    later.load_state_dict({**old, "epoch": 2})
    assert {int(s) % 8 for s in later.next_batch()["input_ids"][:, 0]} == {0}
