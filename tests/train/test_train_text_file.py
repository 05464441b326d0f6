"""`dtl train --data notes.txt`: one plain text file (a single document) trains end to end,
its last tokens held out for val; a file too small for a train and a val row says so."""

from __future__ import annotations

import json
import random

from train_helpers import cli, train_argv

from dtl.run_dir import latest_checkpoint

SUBJECTS = (
    "The old miller",
    "A quiet student",
    "Her brother",
    "The harbour pilot",
    "Nobody",
    "The committee",
    "A tired horse",
    "My neighbour",
    "The first engineer",
    "Each sailor",
)
VERBS = (
    "carried",
    "painted",
    "forgot",
    "measured",
    "sold",
    "described",
    "repaired",
    "followed",
    "borrowed",
    "counted",
)
OBJECTS = (
    "the broken lantern",
    "seven copper coins",
    "a map of the valley",
    "the winter wheat",
    "an unfinished letter",
    "the north bridge",
    "two grey geese",
    "the station clock",
    "a box of nails",
    "the long report",
)
ENDINGS = (
    "before dawn.",
    "without a word.",
    "in the rain.",
    "for the third time.",
    "while the bells rang.",
    "near the mill.",
    "as the tide turned.",
    "after supper.",
)


def _notes(path, sentences):
    """Varied generated prose, one paragraph a line and no blank lines: a single document."""
    rng = random.Random(0)
    lines = []
    for _ in range(sentences // 5):
        lines.append(
            " ".join(
                f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                f"{rng.choice(ENDINGS)}"
                for _ in range(5)
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _train(data, tok, run, *extra):
    return train_argv(
        data, run, *extra, tokenizer=tok, seq_len=32, max_steps=3, eval_every=2, eval_batches=1
    )


def test_one_text_file_trains_with_its_tail_as_val(tmp_path, capsys):
    notes = _notes(tmp_path / "notes.txt", 600)  # ~30 kB
    code, _, err = cli(
        ["tokenizer", "train", str(notes), "--vocab-size", "400", "-o", str(tmp_path / "tok")],
        capsys,
    )
    assert code == 0, err
    run = tmp_path / "run"
    code, out, err = cli(_train(notes, tmp_path / "tok", run), capsys)
    assert code == 0, err
    assert "preparing" in out
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert (meta["split"], meta["documents"]) == ("tokens", 1)
    assert meta["train"]["rows"] > 0 and meta["val"]["rows"] > 0
    assert latest_checkpoint(run) is not None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert val_losses and all(0 < v < 20 for v in val_losses)


def test_a_text_file_too_small_for_two_rows_says_what_to_do(tmp_path, capsys):
    notes = _notes(tmp_path / "notes.txt", 600)
    code, _, err = cli(
        ["tokenizer", "train", str(notes), "--vocab-size", "400", "-o", str(tmp_path / "tok")],
        capsys,
    )
    assert code == 0, err
    small = tmp_path / "small.txt"
    small.write_text("The old miller sold the broken lantern.\n")  # ~10 tokens; 2 rows need 66
    code, _, err = cli(_train(small, tmp_path / "tok", tmp_path / "run"), capsys)
    assert code == 2
    lines = err.strip().splitlines()  # (prepare's progress bar may come first)
    assert lines[-1].startswith("dtl train: error: ") and "Traceback" not in err, err
    assert "small.txt" in err and "too few for a train row and a val row" in err
    assert "--seq-len N" in err
    assert not (tmp_path / "run" / "data").exists()
