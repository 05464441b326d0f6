"""Do answers end, and do they loop? `dtl ask`'s settings with and without a repetition penalty.

For a Q&A run (e.g. `dtl quickstart`'s runs/demo), two question sets:
  held-out  the Q&A pairs of the run's own corpus (RUN/corpus/*.jsonl: SQuAD records and
            the pairs `article_to_qa` makes from the articles) whose document went to val
            (the same seeded split `dtl prepare` made), so the model never trained on them;
  seen      the same kind of pairs from documents in train (what a first user types, like
            "What is anarchism?", mostly is one of these).
Each question is answered as `dtl ask` answers it (greedy, `qa_stops()`, max 64 new tokens)
with each `--configs` PENALTY:NGRAM (repetition penalty, no-repeat n-gram size; 1:0 is plain
greedy). Printed per set and config:
  ended     share of answers that stop (end-of-text or a Q&A marker) before the token limit
  rep3      share of answers with a repeated word 3-gram ("of the history ... of the history")
  EM / F1   SQuAD exact match and F1 (official normalisation) against the pair's answer

    python benchmarks/bench_answers.py --model runs/demo [--limit 200] [--configs 1:0 1.3:0 1:3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from dtl.data.loader import read_meta
from dtl.data.prepare import records_to_examples
from dtl.data.qa import qa_stops
from dtl.data.sources import iter_records
from dtl.data.split import is_val
from dtl.generate.evaluate import normalize_answer, squad_scores
from dtl.generate.sampling import ASK_DEFAULTS
from dtl.generate.text import generate
from dtl.model.store import load_model


def question_sets(run: Path) -> dict[str, list[tuple[str, str]]]:
    """(question, answer) pairs of the run's sources, split as `dtl prepare` split them
    (by document: the sources in their order, the seed and val fraction of RUN/data)."""
    meta = read_meta(run / "data")
    if meta.get("split") != "documents":
        raise SystemExit(f"{run}/data was split within documents; no held-out questions")
    seed, val_fraction = meta["seed"], meta["val_fraction"]
    records = [r for source in meta["sources"]
               for r in iter_records(source["path"], source["kind"])]  # fmt: skip
    sets: dict[str, list[tuple[str, str]]] = {"held-out": [], "seen": []}
    for ex in records_to_examples(records, articles_as="both"):
        if ex.is_qa:
            question = ex.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
            name = "held-out" if is_val(ex.key, seed, val_fraction) else "seen"
            sets[name].append((question, ex.completion.strip()))
    return sets


def has_repeated_ngram(text: str, n: int = 3) -> bool:
    words = normalize_answer(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def measure(model, tokenizer, pairs, penalty: float, ngram: int, batch_size: int = 16) -> dict:
    options = dataclasses.replace(ASK_DEFAULTS, repetition_penalty=penalty,
                                  no_repeat_ngram_size=ngram, stop=qa_stops())  # fmt: skip
    done = []
    for start in range(0, len(pairs), batch_size):
        prompts = [f"Question: {q}\nAnswer:" for q, _ in pairs[start : start + batch_size]]
        done += generate(model, tokenizer, prompts, options=options)
    answers = [c.text.strip() for c in done]
    scores = squad_scores(answers, [[a] for _, a in pairs])
    return {
        "penalty": penalty,
        "ngram": ngram,
        "n": len(pairs),
        "ended": sum(c.finish_reason == "stop" for c in done) / len(done),
        "rep3": sum(has_repeated_ngram(a) for a in answers) / len(answers),
        "em": scores["exact_match"],
        "f1": scores["f1"],
        "example": answers[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a quickstart-style run dir")
    parser.add_argument("--checkpoint", help="a checkpoint of that run (default: its latest)")
    parser.add_argument("--limit", type=int, default=200, help="questions per set (200)")
    parser.add_argument("--configs", nargs="+", default=["1:0", "1.2:0", "1.3:0", "1:3", "1.3:3"])
    args = parser.parse_args()
    model, tokenizer = load_model(args.checkpoint or args.model, device="cpu")
    sets = question_sets(Path(args.model))
    for name, pairs in sets.items():
        pairs = pairs[: args.limit]
        for config in args.configs:
            penalty, ngram = config.split(":")
            row = measure(model, tokenizer, pairs, float(penalty), int(ngram))
            print(json.dumps({"set": name, **row}), flush=True)


if __name__ == "__main__":
    main()
