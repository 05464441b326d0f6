"""`dtl quickstart`: the main job on the embedded corpus, offline, from one command."""

from __future__ import annotations

import bz2
import hashlib
import json

import pytest
import yaml
from testkit import run_cli

from dtl.corpus import corpus_files


def test_the_corpus_ships_with_the_package_and_matches_its_notice():
    wiki, squad = corpus_files()
    notice = (wiki.parent / "NOTICE.md").read_text(encoding="utf-8")
    for path in (wiki, squad):
        assert path.is_file(), f"{path} is missing from the package"
        assert (
            hashlib.sha256(path.read_bytes()).hexdigest() in notice
        )  # the licence note is current
    assert "CC BY-SA" in notice
    # What the NOTICE promises, counted from the raw files (not through DTL's parsers).
    xml = bz2.decompress(wiki.read_bytes()).decode("utf-8")
    assert xml.count("<page>") == 106 and "<redirect" not in xml
    data = json.loads(squad.read_text(encoding="utf-8"))
    questions = [qa for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert len(questions) == 293 and all(qa["answers"] for qa in questions)


@pytest.mark.slow
def test_quickstart_pretrains_then_fine_tunes_a_model_that_loads_and_answers(tmp_path, capsys):
    run = tmp_path / "demo"
    argv = ["quickstart", "--out", run, "--max-steps", "3", "--finetune-steps", "2"]
    code, out, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 0, err
    assert "1/6 clean" in out and "4/6 pretrain" in out and "5/6 fine-tune" in out
    assert f"dtl ask --model {run}" in out and f"dtl serve --model {run}" in out
    # The clean stage: every SQuAD question and every article that is not a disambiguation page.
    squad = [json.loads(line) for line in open(run / "corpus" / "squad-excerpt.jsonl")]
    assert len(squad) == 293 and {r["title"] for r in squad} == {
        "Normans",
        "Computational_complexity_theory",
    }
    articles = [json.loads(line) for line in open(run / "corpus" / "wikipedia-excerpt.jsonl")]
    assert 90 <= len(articles) < 106 and all("{{" not in r["text"] for r in articles)
    # Held-out questions: whole paragraphs, none of them in the Q&A the model trains on.
    held = [json.loads(line) for line in open(run / "corpus" / "squad-heldout.jsonl")]
    trained = [json.loads(line) for line in open(run / "corpus" / "squad-train.jsonl")]
    assert len(held) + len(trained) == 293 and 20 <= len(held) <= 60
    assert not {r["context"] for r in held} & {r["context"] for r in trained}
    # Stage 1: articles as packed text; stage 2: Q&A rows with the loss on the answers.
    text_meta = json.loads((run / "pretrain" / "data" / "meta.json").read_text())
    assert text_meta["mode"] == "pack" and text_meta["qa_examples"] == 0
    qa_meta = json.loads((run / "data" / "meta.json").read_text())
    assert (
        qa_meta["mode"] == "pad" and qa_meta["answer_only_loss"] and qa_meta["vocab_size"] == 8192
    )
    assert qa_meta["qa_examples"] > len(trained)  # SQuAD's and the articles' pairs
    pre_metrics = [json.loads(line) for line in open(run / "pretrain" / "metrics.jsonl")]
    assert pre_metrics[-1]["step"] == 3 and "val_loss" in pre_metrics[-1]
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert metrics[-1]["step"] == 2 and "val_loss" in metrics[-1]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["init_from"] == str(run / "pretrain")
    # The table: both stages' val perplexity (as logged) and EM/F1 before and after.
    row1 = next(line for line in out.splitlines() if line.startswith("1 pretrain"))
    row2 = next(line for line in out.splitlines() if line.startswith("2 fine-tune"))
    assert f"{pre_metrics[-1]['val_ppl']:.2f}" in row1 and f"{metrics[-1]['val_ppl']:.2f}" in row2
    assert f"EM/F1 on {len(held)} held-out SQuAD questions" in out

    from dtl.model.store import load_model

    model, tok = load_model(str(run))
    pre_model, pre_tok = load_model(str(run / "pretrain"))
    assert model.config == pre_model.config and model.config.d_model == 128
    assert tok.encode("Normandy, a region in France") == pre_tok.encode(
        "Normandy, a region in France"
    )
    code, out, err = run_cli(
        ["ask", "--model", run, "What is anarchism?", "--max-new-tokens", "8"], capsys
    )
    assert code == 0, err
    assert out.strip()


def test_quickstart_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    run = tmp_path / "notes"
    run.mkdir()
    (run / "mine.txt").write_text("keep me")
    code, out, err = run_cli(["quickstart", "--out", run], capsys)
    assert (
        code == 2
        and "is not empty (it is not a dtl run dir)" in err
        and "choose a new --out" in err
    )
    assert err.count("\n") == 1  # one line, no traceback
    assert sorted(p.name for p in run.iterdir()) == ["mine.txt"]
    assert (run / "mine.txt").read_text() == "keep me"
    code, _, err = run_cli(["quickstart", "--out", tmp_path / "new", "--max-steps", "0"], capsys)
    assert code == 2 and "--max-steps must be a positive integer" in err
    code, _, err = run_cli(
        ["quickstart", "--out", tmp_path / "new", "--finetune-steps", "0"], capsys
    )
    assert code == 2 and "--finetune-steps must be a positive integer" in err
    assert not (tmp_path / "new").exists()
    assert not (tmp_path / "new").exists()


def test_quickstart_names_what_an_unfinished_one_left(tmp_path, capsys):
    run = tmp_path / "demo"
    (run / "corpus").mkdir(parents=True)  # interrupted during the first stages
    code, _, err = run_cli(["quickstart", "--out", run], capsys)
    assert code == 2 and "an unfinished quickstart: delete it" in err
    (run / "config.yaml").write_text("preset: tiny\n")
    code, _, err = run_cli(["quickstart", "--out", run], capsys)
    assert code == 2 and f"dtl train --resume {run}" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--vocab-size", "100"], "--vocab-size 100 must be between 257"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--max-time", "0"], "--max-time must be a positive number of minutes"),
        (["--max-time", "ten"], "--max-time must be a positive number of minutes"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    code, _, err = run_cli(["quickstart", "--out", tmp_path / "new", *flags], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()


def test_max_time_bounds_the_pretraining_by_time_and_keeps_the_fine_tune(tmp_path):
    """--max-time: the pretraining trains for that long (no step cap, warmup by time), the
    fine-tune keeps its steps; without it the recipe is the one it always was."""
    from dtl.quickstart import FINETUNE, RECIPE, finetune_config, train_config

    plain = train_config(tmp_path / "pretrain")
    assert (plain.max_steps, plain.max_time, plain.warmup_steps) == (1100, None, 100)
    assert (plain.eval_every, plain.save_every) == (275, 275)
    timed = train_config(tmp_path / "pretrain", max_time=10.0)
    assert (timed.max_steps, timed.max_time, timed.warmup_steps) == (None, 10.0, None)
    assert (timed.eval_every, timed.lr, timed.batch_size) == (275, RECIPE["lr"], 16)
    capped = train_config(tmp_path / "pretrain", max_time=10.0, max_steps=50)
    assert (capped.max_steps, capped.eval_every, capped.save_every) == (50, 50, 50)
    fine = finetune_config(tmp_path, FINETUNE["max_steps"], timed)
    assert (fine.max_steps, fine.max_time, fine.warmup_steps) == (100, None, 10)
