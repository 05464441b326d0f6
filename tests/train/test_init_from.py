"""`dtl train --init-from MODEL`: a second stage that starts from a trained model's weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from train_helpers import TINY_MODEL, fails_here, tiny_config, train_argv

from dtl.data.loader import BatchLoader
from dtl.data.prepare import prepare
from dtl.model.config import ModelConfig
from dtl.model.store import load_model
from dtl.model.transformer import TransformerLM
from dtl.tokenizer import load_tokenizer, train_tokenizer
from dtl.train import train
from dtl.train.loop import Trainer


@pytest.fixture(scope="module")
def source_run(packed_data, tmp_path_factory) -> Path:
    """A pretrained tiny model: 4 steps on the packed WikiText rows."""
    out = tmp_path_factory.mktemp("src") / "pretrain"
    train(tiny_config(packed_data, out, max_steps=4))
    return out


@pytest.fixture(scope="module")
def answer_only_data(tokenizer_dir, tmp_path_factory) -> Path:
    """SQuAD Q&A rows, padded to 48 tokens, with the loss on the answers only."""
    from train_helpers import shared_path

    out = tmp_path_factory.mktemp("qa") / "squad-answers"
    prepare(
        [shared_path("squad", "squad-v2-dev-small.json")],
        out,
        tokenizer=str(tokenizer_dir),
        kind="squad",
        max_length=48,
        val_fraction=0.2,
        seed=0,
        answer_only_loss=True,
        progress=False,
    )
    return out


def _first_logged_loss(run: Path) -> float:
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return next(r["loss"] for r in records if r.get("step") == 1 and "loss" in r)


def test_a_bf16_fine_tune_runs_on_the_source_weights_rounded(source_run, packed_data, tmp_path):
    """bf16 on a CPU: the fp32 masters are the source's weights, and the bf16 copies the
    forward runs on are those rounded to bf16 (the embedding shared, fp32)."""
    source, _ = load_model(source_run)
    cfg = tiny_config(packed_data, tmp_path / "ft", init_from=str(source_run), max_steps=1,
                      precision="bf16")  # fmt: skip
    trainer = Trainer(cfg)
    want = source.state_dict()
    masters = dict(trainer.model.named_parameters())
    for name, low in trainer.copies.model.named_parameters():
        assert torch.equal(masters[name], want[name])
        expected = want[name] if name.startswith("embedding.") else want[name].to(torch.bfloat16)
        assert low.dtype == expected.dtype and torch.equal(low, expected), name
    assert trainer.run()["step"] == 1


def test_a_fine_tune_starts_from_the_source_weights_with_a_fresh_optimizer(
    source_run, packed_data, tmp_path
):
    source, _ = load_model(source_run)
    cfg = tiny_config(packed_data, tmp_path / "ft", init_from=str(source_run), max_steps=1)
    trainer = Trainer(cfg)
    want = source.state_dict()
    got = trainer.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert trainer.state.step == 0 and not trainer.optimizer.state  # no moments carried over
    x = torch.randint(0, 512, (2, 16))
    assert torch.equal(trainer.model.eval()(x), source(x))  # the step-0 forward is the source's
    trainer.model.train()
    summary = trainer.run()
    assert summary["step"] == 1
    # Warmup starts again: step 1's lr is lr / warmup_steps, as at a new run's first step.
    first = json.loads(open(tmp_path / "ft" / "metrics.jsonl").readline())
    assert first["lr"] == pytest.approx(cfg.lr / cfg.warmup_steps)
    # The first logged loss is the source's loss on the first batch, computed here by hand.
    batch = next(iter(BatchLoader(packed_data, "train", cfg.batch_size, seed=cfg.seed)))
    with torch.no_grad():
        logits = source(batch["input_ids"])
    oracle = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    assert _first_logged_loss(tmp_path / "ft") == pytest.approx(float(oracle), rel=1e-5)
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["init_from"] == str(source_run)
    assert Path(saved["init_from_resolved"]).parent.parent == source_run.resolve()


def _prompt_end(tok, ids: list[int]) -> int | None:
    """The index of the last prompt token of one Q&A row ("Question: ...\\nAnswer:")."""
    for i in range(len(ids)):
        if tok.decode(ids[: i + 1]).endswith("\nAnswer:"):
            return i
    return None  # a question cut off by max_length: nothing of it is scored


def test_answer_only_loss_counts_the_answer_and_its_end_of_text(
    source_run, answer_only_data, tokenizer_dir, tmp_path
):
    cfg = tiny_config(answer_only_data, tmp_path / "qa", init_from=str(source_run), max_steps=1)
    train(cfg)
    source, _ = load_model(source_run)
    tok = load_tokenizer(str(tokenizer_dir))
    batch = next(iter(BatchLoader(answer_only_data, "train", cfg.batch_size, seed=cfg.seed)))
    with torch.no_grad():
        logp = torch.log_softmax(source(batch["input_ids"]), dim=-1)  # (B, T, V)
    # The oracle: from each row's text, every token after "Answer:" up to and including the
    # end-of-text that closes the example (so the model learns to stop), and nothing else.
    total, count, ends = 0.0, 0, 0
    for row, ids in enumerate(batch["input_ids"].tolist()):
        n = int(batch["attention_mask"][row].sum())  # the real tokens; the rest is padding
        example = ids[:n] + [int(batch["targets"][row, n - 1])]  # the row's last token too
        start = _prompt_end(tok, example)
        if start is None:
            continue
        stop = example.index(tok.eos_id, start) if tok.eos_id in example[start:] else n
        ends += stop < n + 1 and example[stop] == tok.eos_id
        for pos in range(start, stop):  # position pos predicts token pos + 1
            total -= float(logp[row, pos, example[pos + 1]])
            count += 1
    assert count > 0 and ends > 0  # answers were scored, end-of-text included
    assert _first_logged_loss(tmp_path / "qa") == pytest.approx(total / count, rel=1e-5)


def test_the_tokenizer_travels_and_a_raw_file_is_prepared_with_it(source_run, corpus, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(corpus.read_bytes()[200_000:260_000])
    out = tmp_path / "notes-ft"
    train(tiny_config(text, out, init_from=str(source_run), max_steps=2, seq_len=16))
    _, source_tok = load_model(source_run)
    model, tok = load_model(out)
    sample = "The Battle of Hastings , fought in 1066 , ended Saxon rule ."
    assert tok.encode(sample) == source_tok.encode(sample)  # the new run's model dir
    assert tok.decode(tok.encode(sample)) == sample
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and model.config.d_model == TINY_MODEL["d_model"]
    # The model says both contexts: fine-tuned at 16 tokens, from one trained at 32.
    source_context = load_model(source_run)[0].config.context
    assert source_context == 32
    assert (model.config.trained_seq_len, model.config.base_seq_len) == (16, 32)
    assert model.config.context == 16
    # --resume continues the new run from its own checkpoint, with its own sizes.
    summary = train(
        tiny_config(text, out, init_from=str(source_run), max_steps=3, seq_len=16), resume=True
    )
    assert summary["step"] == 3


def test_mismatches_are_one_clear_line(
    source_run, packed_data, corpus, tmp_path, tmp_path_factory, capsys
):
    ft = tmp_path / "ft"
    fails_here(
        capsys,
        [*train_argv(packed_data, ft, "--init-from", source_run), "--d-model", "48"],
        "--d-model 48 differs from the model's d_model 32",
    )
    fails_here(
        capsys,
        ["train", "--resume", source_run, "--init-from", source_run],
        "give --resume or --init-from, not both",
    )
    fails_here(
        capsys,
        train_argv(packed_data, ft, "--init-from", tmp_path / "nowhere"),
        "--init-from",
        "no such model",
    )
    # Another BPE of the same size, learnt from other text: same vocab_size, other ids.
    other_text = tmp_path / "other.raw"
    other_text.write_bytes(corpus.read_bytes()[-100_000:])
    other_tok = tmp_path / "other-tok"
    train_tokenizer([other_text], 512, other_tok, show_progress=False)
    other = tmp_path / "other-data"
    prepare([other_text], other, tokenizer=str(other_tok), max_length=32, progress=False)
    fails_here(
        capsys,
        train_argv(other, ft, "--init-from", source_run),
        "the data's tokenizer (bpe, 512 tokens",
        "is not the model's",
    )
    assert not (ft / "checkpoints").exists()


def test_a_legacy_checkpoint_is_a_source(gpt2, corpus, tmp_path):
    config = ModelConfig(vocab_size=50257, d_model=32, n_heads=8, n_layers=1, d_ff=64,
                         max_seq_length=512, dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    legacy = TransformerLM(config)
    pt = tmp_path / "best_model.pt"
    torch.save({"model_state_dict": legacy.state_dict(), "epoch": 3}, pt)
    text = tmp_path / "notes.txt"
    text.write_bytes(corpus.read_bytes()[:20_000])
    out = tmp_path / "from-legacy"
    cfg = tiny_config(text, out, init_from=str(pt), max_steps=1, seq_len=32, lr=None,
                      d_model=None, n_heads=None, n_layers=None, d_ff=None)  # fmt: skip
    trainer = Trainer(cfg)
    # The default lr follows the model it trains (32 wide), not the tiny preset (128 wide):
    # 1e-3 * sqrt(128 / 32), the rule's value worked by hand.
    assert trainer.resolved.schedule.lr == pytest.approx(2e-3)
    want = legacy.state_dict()
    assert all(torch.equal(trainer.model.state_dict()[k], want[k]) for k in want)
    trainer.run()
    model, tok = load_model(out)
    assert tok.name == "gpt2" and model.config.vocab_size == 50257 and model.config.n_heads == 8
    # Resuming keeps the source's sizes (not the tiny preset's, which no flag overrode here).
    resumed = train(dataclasses.replace(cfg, max_steps=2), resume=True)
    assert resumed["step"] == 2 and load_model(out)[0].config == model.config


# ---------------------------------------------------------------------- a damaged source
def _nan_model_dir(directory, tokenizer):
    """A model dir (with GPT-2's tokenizer) whose final LayerNorm holds two NaNs."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                         max_seq_length=32)  # fmt: skip
    model = TransformerLM(config)
    with torch.no_grad():
        model.ln_f.weight[:2] = float("nan")
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def _nan_legacy_pt(path):
    """A legacy .pt (the original scripts' dict) whose head bias holds an Inf."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50257, d_model=16, n_heads=8, n_layers=1, d_ff=32,
                         max_seq_length=32)  # fmt: skip
    state = TransformerLM(config).state_dict()
    state["head.bias"][3] = float("inf")
    torch.save({"model_state_dict": state, "epoch": 1}, path)
    return path


@pytest.mark.parametrize("kind", ["model_dir", "legacy_pt"])
def test_a_source_with_non_finite_weights_is_refused_as_generate_refuses_it(
    kind, gpt2, dtl, corpus, tmp_path
):
    """`dtl train --init-from` loads its source as `dtl generate` does: NaN/Inf weights are
    refused before anything is prepared or written, with generate's own line."""
    if kind == "model_dir":
        source, tensor = _nan_model_dir(tmp_path / "broken", gpt2), "ln_f.weight holds 2"
    else:
        source, tensor = _nan_legacy_pt(tmp_path / "broken.pt"), "head.bias holds 1"
    code, out, err = dtl("generate", "--model", source, "--prompt", "a", "--max-new-tokens", "2")
    assert code == 2, (out, err)
    generate_line = err.strip().splitlines()[-1].removeprefix("dtl generate: error: ")
    assert tensor in generate_line and "non-finite" in generate_line
    text = tmp_path / "notes.txt"
    text.write_bytes(corpus.read_bytes()[:20_000])
    out_dir = tmp_path / "ft"
    code, out, err = dtl("train", "--data", text, "--out", out_dir, "--init-from", source,
                         "--max-steps", "1", "--device", "cpu", "--no-progress")  # fmt: skip
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1] == f"dtl train: error: {generate_line}" and "Traceback" not in err, err
    assert not out_dir.exists()  # refused before the run dir or its data was made
