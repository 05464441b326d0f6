"""Evaluation: the SQuAD scorer against hand-computed cases, perplexity and bits per byte
against a model whose answer is known exactly, and `dtl eval` end to end on real files."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from testkit import shared_path
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dtl import ModelConfig, TransformerLM
from dtl.generate.evaluate import evaluate_lm, exact_match, f1_score, normalize_answer, squad_scores
from dtl.model import head_loss


# ---------------------------------------------------------------------- the SQuAD scorer
@pytest.mark.parametrize(
    "text, normal",
    [
        ("The Normans", "normans"),
        ("  A  cat, the hat. An apple!  ", "cat hat apple"),
        ("Theory of the (Normans)", "theory of normans"),
        ("1,000 B.C.", "1000 bc"),
        ("them another", "them another"),  # articles only as whole words
    ],
)
def test_normalize_answer_hand_cases(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_f1_hand_computed():
    assert exact_match("the Normans.", ["Normans", "Norsemen"]) == 1.0
    assert exact_match("Normans from Normandy", ["Normans"]) == 0.0
    # "cat sat on mat" vs "cat on mat": overlap 3, precision 3/4, recall 3/3 -> F1 6/7
    assert f1_score("the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(6 / 7)
    # the best gold answer counts: "10th" vs "10th century": precision 1, recall 1/2 -> 2/3
    assert f1_score("the 10th", ["in France", "10th century"]) == pytest.approx(2 / 3)
    # repeated tokens count as often as both sides have them: overlap 1 -> P 1/3 R 1
    assert f1_score("Paris Paris Paris", ["Paris"]) == pytest.approx(0.5)
    assert f1_score("nothing shared", ["Normandy"]) == 0.0


def test_unanswerable_questions_want_an_empty_answer():
    assert exact_match("", []) == 1.0 and f1_score("", []) == 1.0
    assert exact_match("the", []) == 1.0  # normalises to empty
    assert exact_match("Normandy", []) == 0.0 and f1_score("Normandy", []) == 0.0
    assert f1_score("", ["Normandy"]) == 0.0


def test_squad_scores_split_answerable_and_unanswerable():
    scores = squad_scores(
        ["Normandy", "the cat sat on the mat", "", "Rollo"],
        [["Normandy", "in Normandy"], ["a cat on a mat"], [], []],
    )
    assert scores["count"] == 4
    assert scores["exact_match"] == pytest.approx(100 * 2 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 6 / 7 + 1 + 0) / 4)
    assert scores["has_ans_count"] == 2 and scores["has_ans_exact_match"] == pytest.approx(50)
    assert scores["no_ans_count"] == 2 and scores["no_ans_f1"] == pytest.approx(50)


def uniform_model(vocab_size: int, max_seq_length: int) -> TransformerLM:
    """A model whose every prediction is uniform: perplexity = vocab size, exactly."""
    config = ModelConfig(vocab_size=vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                         max_seq_length=max_seq_length)  # fmt: skip
    model = TransformerLM(config).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model


def test_uniform_model_has_perplexity_of_its_vocabulary(gpt2):
    texts = ["The Normans were the people who gave their name to Normandy. " * 6,
             "Naïve café, 日本語.", "Short."]  # fmt: skip
    n_tokens = sum(len(gpt2.encode(t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    # a 16-token context cuts the first text into several windows
    out = evaluate_lm(uniform_model(gpt2.vocab_size, 16), gpt2, texts, batch_size=3)
    assert out["tokens"] == n_tokens and out["bytes"] == n_bytes and out["documents"] == 3
    assert out["perplexity"] == pytest.approx(gpt2.vocab_size, rel=1e-4)
    assert out["bits_per_byte"] == pytest.approx(n_tokens * math.log2(gpt2.vocab_size) / n_bytes,
                                                 rel=1e-4)  # fmt: skip


def test_windowing_scores_each_token_once_as_the_full_sequence_would(gpt2):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=gpt2.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                         max_seq_length=64)  # fmt: skip
    model = TransformerLM(config).eval()
    text = "Rollo was a Viking who became the first ruler of Normandy."
    ids = [gpt2.eos_id] + gpt2.encode(text)
    assert len(ids) < 64
    with torch.no_grad():  # the oracle: one pass over the whole sequence
        logits = model(torch.tensor([ids]))[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    out = evaluate_lm(model, gpt2, [text])
    assert out["tokens"] == len(ids) - 1
    assert out["nll"] == pytest.approx(float(nll), rel=1e-5)
    limited = evaluate_lm(model, gpt2, [text, text], max_tokens=5)
    assert limited["tokens"] == 5 and limited["documents"] == 1


class LargestAllocation(TorchDispatchMode):
    """Watches every torch op and keeps the most elements of any tensor one allocates (a
    view or an in-place/out= result shares an input's storage: not a new allocation)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.numel())
        return out


def test_perplexity_equals_full_logits_oracle_without_building_the_logits(gpt2, monkeypatch):
    """Eval's figures are torch's cross-entropy on each window's full logits, to float
    rounding, while no (batch, window, vocab) logits tensor is ever allocated: at most one
    chunk of the fused head + loss (here 4 tokens' logits, chunks made small to see it)."""
    torch.manual_seed(0)
    V, window = gpt2.vocab_size, 16
    config = ModelConfig(vocab_size=V, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                         max_seq_length=window)  # fmt: skip
    model = TransformerLM(config).eval()
    texts = ["The Normans were the people who gave their name to Normandy. " * 3,
             "Naïve café, 日本語.", "Rollo was a Viking."]  # fmt: skip
    # The oracle: `<|endoftext|> doc` per document, one stream cut into windows of the
    # model's context, each window alone through the plain forward and torch's loss.
    ids, targets = [], []
    for text in texts:
        ids += [gpt2.eos_id] + gpt2.encode(text)
        targets += [-100] + gpt2.encode(text)
    assert len(ids) > 3 * window  # several full windows and a short last one
    nll = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            n = min(window, len(ids) - 1 - s)
            logits = model(torch.tensor([ids[s : s + n]]))[0]  # (n, V)
            nll += float(F.cross_entropy(logits.double(), torch.tensor(targets[s + 1 : s + n + 1]),
                                         ignore_index=-100, reduction="sum"))  # fmt: skip
    n_tokens = sum(t != -100 for t in targets)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)

    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 4 * V)
    with LargestAllocation() as watch:
        out = evaluate_lm(model, gpt2, texts, batch_size=3)
    assert watch.largest <= 4 * V, f"a tensor of {watch.largest / V:.0f} tokens' logits"
    assert out["tokens"] == n_tokens and out["bytes"] == n_bytes
    assert out["nll"] == pytest.approx(nll / n_tokens, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(nll / n_tokens), rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)


# ---------------------------------------------------------------------- dtl eval end to end
@pytest.fixture
def model_dir(tmp_path, gpt2):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=gpt2.vocab_size, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                         max_seq_length=64)  # fmt: skip
    TransformerLM(config).save_pretrained(tmp_path / "model")
    gpt2.save(tmp_path / "model")
    return tmp_path / "model"


def test_dtl_eval_squad_end_to_end(model_dir, dtl, tmp_path):
    squad = shared_path("squad", "squad-v2-dev-small.json")
    preds = tmp_path / "preds.jsonl"
    code, out, err = dtl("eval", "--model", model_dir, "--data", squad, "--limit", 24,
                         "--max-new-tokens", 8, "--json", "--predictions", preds)  # fmt: skip
    assert code == 0, err
    scores = json.loads(out)
    assert scores["task"] == "qa" and scores["count"] == 24
    assert scores["has_ans_count"] + scores["no_ans_count"] == 24
    assert 0.0 <= scores["exact_match"] <= scores["f1"] <= 100.0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 24 and rows[0]["question"] == "In what country is Normandy located?"
    # the scores are those of the written predictions against the file's gold answers
    from dtl.data.sources import iter_records

    gold = [r["answers"] for r in iter_records(squad, "squad", unanswerable="")][:24]
    again = squad_scores([r["prediction"] for r in rows], gold)
    assert again["f1"] == pytest.approx(scores["f1"])


def test_dtl_eval_scores_what_dtl_ask_prints(model_dir, dtl, tmp_path):
    """The SQuAD scores are of the answers `dtl ask` gives with its defaults (repetition
    penalty, Q&A stops, 64 new tokens), and `dtl eval` says so."""
    questions = ["Who was Rollo?", "In what country is Normandy located?", "What is a river?",
                 "When did the Normans arrive?"]  # fmt: skip
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "Rollo"}) + "\n"
                            for q in questions))  # fmt: skip
    preds = tmp_path / "preds.jsonl"
    code, out, err = dtl("eval", "--model", model_dir, "--data", data, "--predictions", preds,
                         "--batch-size", 3)  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[1] == ("  answered as dtl ask: greedy, repetition penalty 1.3, at "
                                   "most 64 new tokens, stop at end-of-text or '\\nQuestion:', "
                                   "'\\nAnswer:'")  # fmt: skip
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    for question, row in zip(questions, rows, strict=True):
        code, asked, err = dtl("ask", "--model", model_dir, question)
        assert code == 0, err
        assert row["prediction"] == asked.strip(), question
    code, out, err = dtl("eval", "--model", model_dir, "--data", data, "--json",
                         "--repetition-penalty", 1, "--max-new-tokens", 5)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["settings"] == {
        "temperature": 0.0, "top_k": 50, "top_p": None, "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0, "seed": None, "max_new_tokens": 5,
        "stop": ["\nQuestion:", "\nAnswer:"]}  # fmt: skip


def test_dtl_eval_wikitext_end_to_end(model_dir, dtl):
    wiki = shared_path("wikitext-2-raw", "wiki.test.raw")
    code, out, err = dtl("eval", "--model", model_dir, "--data", wiki, "--max-tokens", 2000)
    assert code == 0, err
    assert "2,000 tokens" in out and "perplexity" in out
    ppl = float(out.split("perplexity ")[1].split(",")[0])
    assert 1000 < ppl < 200000  # a random model is near the vocabulary size (50,257)


def test_dtl_eval_bad_inputs(model_dir, tmp_path, dtl):
    code, _, err = dtl("eval", "--model", model_dir, "--data", tmp_path / "nope.txt")
    assert code == 2 and "no such file" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = dtl("eval", "--model", model_dir, "--data", bad)
    assert code == 2 and "not valid JSON" in err
    code, _, err = dtl("eval", "--model", tmp_path, "--data", bad, "--kind", "text")
    assert code == 2 and "neither a model dir" in err
    squad = shared_path("squad", "squad-v2-dev-small.json")
    code, _, err = dtl("eval", "--model", model_dir, "--data", squad,
                       "--predictions", tmp_path / "no" / "p.jsonl")  # fmt: skip
    assert code == 2 and "does not exist" in err
