"""Bytes that are not UTF-8 on the command line or stdin (issue 16): `dtl ask`, `dtl chat` and
`dtl generate --prompt` read them as U+FFFD with a note, like a terminal shows them, instead of
crashing in the tokenizer; a chat session goes on to the next line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtl import ModelConfig, TransformerLM
from dtl.generate import generate
from dtl.tokenizer import load_tokenizer, train_tokenizer

LATIN1_QUESTION = "caf\xe9?".encode("latin-1")  # b"caf\xe9?": not UTF-8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model with a trained byte-level BPE (the `tokenizers` path, as the quickstart's)."""
    root = tmp_path_factory.mktemp("bpe-model")
    text = root / "text.txt"
    text.write_text("the cafe is open. who was there? the cat sat on the mat.\n" * 50)
    tok = train_tokenizer([text], 300, root / "tok", show_progress=False)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                         max_seq_length=64)  # fmt: skip
    TransformerLM(config).save_pretrained(root / "model")
    tok.save(root / "model")
    return root / "model"


def _dtl(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """`python -m dtl ARGS` with byte arguments and stdin, as a shell passes them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LC_ALL": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dtl", *args], input=stdin, capture_output=True, env=env, timeout=120
    )


def _expected(model_dir: Path, prompt: str, n: int) -> str:
    """The library's greedy continuation of `prompt` with U+FFFD where the bad byte was."""
    model = TransformerLM.from_pretrained(model_dir).eval()
    return generate(model, load_tokenizer(model_dir), prompt, n, temperature=0)[0].text


def test_ask_with_a_latin1_question(model_dir):
    done = _dtl(b"ask", b"--model", str(model_dir).encode(), LATIN1_QUESTION,
                b"--max-new-tokens", b"4", b"--repetition-penalty", b"1")  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err, err
    assert "the question is not valid UTF-8" in err and "U+FFFD" in err


def test_generate_with_a_latin1_prompt_on_stdin_and_argv(model_dir):
    want = _expected(model_dir, "caf\ufffd?", 5)
    for args, stdin in (([b"-"], LATIN1_QUESTION), ([LATIN1_QUESTION], b"")):
        done = _dtl(b"generate", b"--model", str(model_dir).encode(), b"--prompt", *args,
                    b"--max-new-tokens", b"5", b"--temperature", b"0", stdin=stdin)  # fmt: skip
        err = done.stderr.decode()
        assert done.returncode == 0 and "Traceback" not in err, err
        assert done.stdout.decode() == want + "\n"
        assert "the prompt is not valid UTF-8" in err


def test_chat_goes_on_after_a_latin1_line(model_dir):
    lines = LATIN1_QUESTION + b"\n" + b"who was there?\n" + b"/settings\n"
    done = _dtl(b"chat", b"--model", str(model_dir).encode(), b"--max-new-tokens", b"3",
                stdin=lines)  # fmt: skip
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in err, err
    assert out.count("dtl> ") == 2  # both questions answered
    assert "temperature=" in out  # and the line after them still read
    assert "the line is not valid UTF-8" in err
