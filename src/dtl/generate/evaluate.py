"""Evaluation: perplexity and bits per byte on text, exact match and F1 on SQuAD.

Language modelling. Every document is scored as `<|endoftext|> doc`: the end-of-text token
is only context, so each of the document's tokens is predicted exactly once, and the text is
cut into windows of the model's context (a window's first token is predicted from the one
before it, so no token is skipped). Each window is scored by the model's fused, chunked head
+ loss (`TransformerLM.loss`, as in training): no (batch, window, vocab) logits are held.
perplexity = exp(total NLL / tokens) and
bits per byte = total NLL / ln 2 / UTF-8 bytes, which compares models of different
tokenizers.

SQuAD. Each question is answered as `dtl ask` answers it by default: the Q&A prompt
("Question: ...\\nAnswer:"), the options `ask_options()` (greedy, repetition penalty 1.3, at
most 64 new tokens, ending at end-of-text or where the model starts another "Question:" or
"Answer:" line), fitted to the context alone, the whitespace around it removed; so the scores
measure what users run. The answer is scored as the official SQuAD v2.0 script does: both
sides lower-cased, punctuation and the articles a/an/the removed, whitespace collapsed; the
best score over all gold answers; an unanswerable question's gold answer is the empty string.

>>> exact_match("The Normans", ["Normans"]), round(f1_score("in France", ["France"]), 3)
(1.0, 0.667)
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import string
from collections.abc import Iterable, Sequence

import torch

from dtl.data.qa import qa_prompt
from dtl.errors import DtlError
from dtl.generate.loop import Request
from dtl.generate.sampling import SamplingOptions, ask_options
from dtl.generate.text import stream_requests

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


# ---------------------------------------------------------------------- SQuAD scoring
def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (official SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _max_over_gold(metric, prediction: str, gold: Sequence[str]) -> float:
    gold = [g for g in gold if normalize_answer(g)] or [""]  # v2: no answer = the empty string
    return max(metric(prediction, g) for g in gold)


def _em(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # both empty: 1, one empty: 0
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    return _max_over_gold(_em, prediction, gold_answers)


def f1_score(prediction: str, gold_answers: Sequence[str]) -> float:
    """The best bag-of-tokens F1 of the normalised prediction against any gold answer."""
    return _max_over_gold(_f1, prediction, gold_answers)


def squad_scores(predictions: Sequence[str], gold: Sequence[Sequence[str]]) -> dict:
    """Percent exact match and F1 overall, and for answerable (HasAns) / unanswerable (NoAns)."""
    if len(predictions) != len(gold):
        raise DtlError(f"{len(predictions)} predictions for {len(gold)} questions")
    groups: dict[str, list[tuple[float, float]]] = {"all": [], "has_ans": [], "no_ans": []}
    for pred, answers in zip(predictions, gold, strict=True):
        pair = (exact_match(pred, answers), f1_score(pred, answers))
        groups["all"].append(pair)
        has = any(normalize_answer(a) for a in answers)
        groups["has_ans" if has else "no_ans"].append(pair)
    out: dict = {}
    for name, pairs in groups.items():
        prefix = "" if name == "all" else f"{name}_"
        out[f"{prefix}count"] = len(pairs)
        if pairs:
            out[f"{prefix}exact_match"] = 100.0 * sum(p[0] for p in pairs) / len(pairs)
            out[f"{prefix}f1"] = 100.0 * sum(p[1] for p in pairs) / len(pairs)
    return out


def evaluate_squad(
    model: torch.nn.Module,
    tokenizer,
    records: Iterable[dict],
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = False,
    options: SamplingOptions | None = None,
) -> dict:
    """Answer each SQuAD record's question as `dtl ask` does and score it (see module docs).

    records: dicts with "question" and "answers" (all gold strings; [] when unanswerable).
    `options` (default `ask_options()`, `dtl ask`'s; Q&A stops are added to any given) and
    `max_new_tokens` (default the options') say how to answer; `batch_size` questions are
    decoded together, each its own request, as it would be alone.
    Returns the `squad_scores` dict plus "predictions": [{"id", "question", "prediction"}]
    and "settings": the options' fields that shaped the answers.

    >>> evaluate_squad(model, tok, [{"question": "Who?", "answers": ["Rollo"]}])  # doctest: +SKIP
    """
    options = ask_options(options) if options is not None else ask_options()
    if max_new_tokens is not None:
        options = dataclasses.replace(options, max_new_tokens=max_new_tokens)
    records = list(records)[:limit] if limit is not None else list(records)
    if not records:
        raise DtlError("no SQuAD questions to evaluate (the file held none)")
    predictions: list[str] = []
    bar = _progress(len(records), "questions", progress)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        requests = [Request([qa_prompt(r["question"])], options) for r in batch]
        texts = [""] * len(batch)
        for chunk in stream_requests(model, tokenizer, requests):
            texts[chunk.index] += chunk.text
        predictions += [t.strip() for t in texts]  # `dtl ask` prints it without the space
        bar.update(len(batch))
    bar.close()
    gold = [_gold_answers(r) for r in records]
    scores = squad_scores(predictions, gold)
    scores["predictions"] = [
        {"id": r.get("id"), "question": r["question"], "prediction": p}
        for r, p in zip(records, predictions, strict=True)
    ]
    scores["settings"] = answer_settings(options)
    return scores


def answer_settings(options: SamplingOptions) -> dict:
    """The fields of `options` that shape a Q&A answer (what `dtl eval` reports it used)."""
    return {
        "temperature": options.temperature,
        "top_k": options.top_k,
        "top_p": options.top_p,
        "repetition_penalty": options.repetition_penalty,
        "no_repeat_ngram_size": options.no_repeat_ngram_size,
        "seed": options.seed,
        "max_new_tokens": options.max_new_tokens,
        "stop": list(options.stop),
    }


def _gold_answers(record: dict) -> list[str]:
    if "answers" in record:
        return [a["text"] if isinstance(a, dict) else str(a) for a in record["answers"]]
    return [record["answer"]] if record.get("answer") else []


# ---------------------------------------------------------------------- perplexity
@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    tokenizer,
    texts: Iterable[str],
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity and bits per byte of the model on `texts` (see the module docs).

    max_tokens: stop after about this many scored tokens (documents are taken whole, the last
    one cut to fit; its bytes are counted from the decoded tokens that were kept).
    Returns {"tokens", "bytes", "nll", "perplexity", "bits_per_byte", "documents", "window"}.
    """
    stream, targets, n_bytes, docs = _token_stream(tokenizer, texts, max_tokens)
    n_scored = int((targets != -100).sum())
    if n_scored == 0:
        raise DtlError("no text to evaluate: the input held no tokens")
    window = model.config.context
    device = next(model.parameters()).device
    total_nll = 0.0
    starts = list(range(0, len(stream) - 1, window))
    bar = _progress(n_scored, "tokens", progress)
    for i in range(0, len(starts), batch_size):
        group = starts[i : i + batch_size]
        # all windows but the last are full; run the short last one on its own
        full = [s for s in group if s + window + 1 <= len(stream)]
        for chunk in ([full] if full else []) + [[s] for s in group if s not in full]:
            n = min(window, len(stream) - 1 - chunk[0])
            x = torch.stack([stream[s : s + n] for s in chunk]).to(device)  # (b, n)
            y = torch.stack([targets[s + 1 : s + n + 1] for s in chunk]).to(device)
            # The fused, chunked head + loss (as training's): the (b, n, V) logits are never
            # built, a few hundred tokens' at a time (`dtl.model.head_loss`), so memory does
            # not grow with vocabulary x window x batch (GPT-2's at 1,024 x 8: 1.6 GB).
            total_nll += float(model.loss(x, y, reduction="sum"))
            bar.update(int((y != -100).sum()))
    bar.close()
    return {
        "documents": docs,
        "tokens": n_scored,
        "bytes": n_bytes,
        "nll": total_nll / n_scored,
        "perplexity": math.exp(total_nll / n_scored),
        "bits_per_byte": total_nll / math.log(2) / n_bytes,
        "window": window,  # the model's context: what it trained at
    }


def _token_stream(
    tokenizer, texts: Iterable[str], max_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """[eos] doc1 [eos] doc2 ... as ids, the targets (-100 at each eos) and the doc bytes."""
    ids: list[int] = []
    targets: list[int] = []
    n_bytes = docs = 0
    for text in texts:
        if not text:
            continue
        tokens = tokenizer.encode(text)
        size = len(text.encode("utf-8"))
        if max_tokens is not None:
            room = max_tokens - len(targets) + docs  # scored tokens still allowed
            if room <= 0:
                break
            if len(tokens) > room:
                tokens = tokens[:room]
                size = len(tokenizer.decode_bytes(tokens))
        ids += [tokenizer.eos_id] + tokens
        targets += [-100] + tokens
        n_bytes += size
        docs += 1
    return torch.tensor(ids), torch.tensor(targets), n_bytes, docs


def _progress(total: int, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", disable=not enabled, leave=False)
