"""Small mistakes at the command line get the verb's own usage or one error line (issue 16):
a misspelt flag, a binary file as a config, a folder as a predictions file, --max-length 0."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from testkit import PROJECT_ROOT

from dtl import ModelConfig, TransformerLM


def _dtl(*args) -> subprocess.CompletedProcess:
    """`python -m dtl ARGS` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dtl", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=120,
    )  # fmt: skip


def _one_line(done: subprocess.CompletedProcess, prefix: str, *needles: str) -> str:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("threads: ")]
    assert len(lines) == 1 and lines[0].startswith(prefix), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_misspelt_flag_shows_the_verbs_usage():
    done = _dtl("quickstart", "--presett", "tiny")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("usage: dtl quickstart ")
    assert "dtl quickstart: error: unrecognized arguments: --presett tiny" in done.stderr
    # a nested verb too, with the nearest real flag as a hint
    done = _dtl(
        "tokenizer", "train", "x.txt", "--vocab-size", "300", "-o", "t", "--min-frequncy", "1"
    )
    assert done.stderr.startswith("usage: dtl tokenizer train ")
    assert "(did you mean --min-frequency?)" in done.stderr


def test_info_with_a_binary_config_is_one_line(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02}q\x00\xff\xfe")
    _one_line(_dtl("info", "--config", evil), "dtl info: error: ", str(evil), "config.json")


def test_eval_predictions_into_a_folder_is_one_line(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=300, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                                      max_seq_length=32))  # fmt: skip
    model.save_pretrained(tmp_path / "m")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question": "Who?", "answer": "Rollo"}\n')
    (tmp_path / "preds").mkdir()
    done = _dtl("eval", "--model", tmp_path / "m", "--data", questions,
                "--predictions", tmp_path / "preds")  # fmt: skip
    _one_line(done, "dtl eval: error: ", "--predictions", "is a directory")
    assert list((tmp_path / "preds").iterdir()) == []


def test_prepare_max_length_zero_is_an_error_not_512(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("Hello world. " * 100)
    for bad in ("0", "-3"):
        done = _dtl("prepare", text, "-o", tmp_path / "d", "--max-length", bad)
        _one_line(done, "dtl prepare: error: ", f"--max-length {bad}")
    assert not (tmp_path / "d").exists()


def test_readme_install_block_installs_cpu_torch_first_and_needs_no_gpt2_folder():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set up", 1)[1]
    block = setup.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    commands = [line.split("#")[0].strip() for line in block]
    cpu = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert commands[:2] == [cpu, "pip install -e ."]
    # GPT-2's tokenizer ships with the package: no example points at the workspace's copy
    assert "shared/data/gpt2" not in readme
