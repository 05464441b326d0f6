"""The Q&A template and the article -> Q&A rule (on the real enwiki excerpt)."""

from __future__ import annotations

import pytest

from dtl.data.prepare import _with_heading_marks
from dtl.data.qa import (
    QA_STOP,
    QA_TEMPLATE,
    article_to_qa,
    format_qa,
    qa_prompt,
    sentences,
    split_qa,
)
from dtl.errors import DtlError


def test_template_is_the_specs():
    assert QA_TEMPLATE == "Question: {question}\nAnswer: {answer}"
    assert (
        format_qa(" Who wrote Hamlet? ", "Shakespeare ")
        == "Question: Who wrote Hamlet?\nAnswer: Shakespeare"
    )
    assert qa_prompt("Who wrote Hamlet?") == "Question: Who wrote Hamlet?\nAnswer:"
    assert QA_STOP == "\nQuestion:"


@pytest.mark.parametrize(
    "template", [QA_TEMPLATE, "Q: {question}\nA: {answer}", "<q>{question}</q>{answer}"]
)
def test_prompt_plus_completion_is_the_example(template):
    prompt, completion = split_qa("What is 2+2?", "4", template)
    assert prompt + completion == format_qa("What is 2+2?", "4", template)
    assert prompt == qa_prompt("What is 2+2?", template) and not prompt.endswith(" ")


def test_bad_template():
    with pytest.raises(DtlError, match=r"must contain \{question\} and end with \{answer\}"):
        format_qa("q", "a", "Question: {question}")


def test_sentences_keep_initials_and_abbreviations():
    text = "J. R. R. Tolkien wrote books. He lived in the U.S. for a while? No. Dr. Who e.g. left."
    assert sentences(text) == [
        "J. R. R. Tolkien wrote books.",
        "He lived in the U.S. for a while?",
        "No. Dr. Who e.g. left.",
    ]


def test_rule_by_hand():
    text = (
        "Ada Lovelace (10 December 1815 – 27 November 1852) was an English mathematician. She wrote notes.\n"
        "== Early life ==\nShe was born in London to Lord Byron.\n"
        "== See also ==\nCharles Babbage was her friend and colleague.\n"
        "== Work ==\nShort.\nHer notes on the Analytical Engine include an algorithm."
    )
    pairs = [(p["question"], p["answer"]) for p in article_to_qa("Ada Lovelace", text)]
    assert pairs == [
        (
            "Who was Ada Lovelace?",
            "Ada Lovelace (10 December 1815 – 27 November 1852) was an English mathematician.",
        ),
        ("What was the early life of Ada Lovelace like?", "She was born in London to Lord Byron."),
        (
            "What does the article on Ada Lovelace say about Work?",
            "Her notes on the Analytical Engine include an algorithm.",
        ),
    ]
    assert (
        list(article_to_qa("1999", "1999 was a year with many events in it.")) == []
    )  # no letter in the title
    # A lead that does not define the title gives "Tell me about", never "What is The?".
    (pair,) = article_to_qa(
        "The Band", "Formed in 1967 in Toronto. They toured with Bob Dylan for years."
    )
    assert pair["question"] == "Tell me about The Band."


def test_rule_on_the_enwiki_excerpt(enwiki):
    records = enwiki[0]
    pairs = [(r, qa) for r in records for qa in article_to_qa(r["title"], _with_heading_marks(r))]
    assert len(pairs) >= 3 * len(records)  # a lead pair and sections for most articles
    for record, qa in pairs:
        name = record["title"].split(" (")[0]
        assert name in qa["question"] and qa["question"].endswith(("?", "."))
        assert qa["answer"] in record["text"]  # answers are the article's own sentences
        assert 4 <= len(qa["answer"].split()) <= 80 and not qa["answer"][0].islower()
    questions = [qa["question"] for _, qa in pairs]
    assert len(set(questions)) == len(questions)
    first = {r["title"]: qa for r, qa in reversed(pairs)}
    assert first["Anarchism"]["question"] == "What is Anarchism?"
    assert first["Abraham Lincoln"]["question"] == "Who was Abraham Lincoln?"
    assert [qa for _, qa in pairs] == [
        qa for r in records for qa in article_to_qa(r["title"], _with_heading_marks(r))
    ]
