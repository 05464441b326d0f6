"""The Q&A template, and a deterministic rule that turns articles into Q&A pairs.

>>> format_qa("Who wrote Hamlet?", "William Shakespeare")
'Question: Who wrote Hamlet?\\nAnswer: William Shakespeare'
>>> qa_prompt("Who wrote Hamlet?")
'Question: Who wrote Hamlet?\\nAnswer:'

Each training example is `format_qa(...)` followed by the end-of-text token. A model asked
`qa_prompt(q)` continues with " answer" and stops at end-of-text (or at `QA_STOP`, in case it
runs on into a new question).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from dtl.errors import DtlError

QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"
QA_STOP = "\nQuestion:"


def _check_template(template: str) -> None:
    if "{question}" not in template or not template.rstrip().endswith("{answer}"):
        raise DtlError(
            f"Q&A template {template!r} must contain {{question}} and end with {{answer}}, "
            f"e.g. {QA_TEMPLATE!r}"
        )


def format_qa(question: str, answer: str, template: str = QA_TEMPLATE) -> str:
    """One example's text (the caller appends the end-of-text token)."""
    _check_template(template)
    return template.replace("{question}", question.strip()).replace("{answer}", answer.strip())


def qa_prompt(question: str, template: str = QA_TEMPLATE) -> str:
    """What precedes the answer: the template up to `{answer}`, without the trailing space."""
    return split_qa(question, "", template)[0]


def split_qa(question: str, answer: str, template: str = QA_TEMPLATE) -> tuple[str, str]:
    """(prompt, completion) whose concatenation is `format_qa(question, answer)`.

    The space before `{answer}` goes with the completion (" William Shakespeare"), the way
    GPT-2's BPE attaches a leading space to a word, so a prompt ends exactly where
    generation starts.
    """
    _check_template(template)
    head = template[: template.rindex("{answer}")].replace("{question}", question.strip())
    prompt = head.rstrip(" ")
    return prompt, head[len(prompt) :] + answer.strip()


# --- Articles -> Q&A pairs ---------------------------------------------------------------
#
# The rule (documented in docs/data.md): an article titled T gives
#   1. "What is T?"  -> the lead's first sentence, when it defines T ("T is/was/are ... ").
#   2. "What is T known for?" / "Tell me about T." -> the first two lead sentences otherwise.
#   3. for each section heading H (up to `max_sections`): "What about the H of T?" -> the
#      section's first sentence (skipping See also / References / ... sections).
# Only titles with a letter and answers of 4..80 words are used, so no "What is The?".

SKIP_SECTIONS = {
    "see also",
    "references",
    "notes",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "notes and references",
    "works cited",
    "gallery",
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_ABBREV = re.compile(r"\b(?:[A-Z]|Mr|Mrs|Dr|St|Jr|Sr|vs|c|ca|e\.g|i\.e|etc|No|U\.S)\.$")
_DEFINES = re.compile(r"\b(?:is|was|are|were|refers to|has been)\b")
_HEADING = re.compile(r"^(={1,6})\s*(.+?)\s*\1\s*$")


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph at sentence ends, not after initials or common abbreviations."""
    parts = _SENTENCE_END.split(paragraph.strip())
    out: list[str] = []
    for part in parts:
        if out and _ABBREV.search(out[-1]):
            out[-1] = f"{out[-1]} {part}"
        else:
            out.append(part)
    return [s.strip() for s in out if s.strip()]


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs; the lead has heading ""."""
    result, heading, body = [], "", []
    for line in text.splitlines():
        match = _HEADING.match(line.strip())
        if match:
            result.append((heading, "\n".join(body).strip()))
            heading, body = match.group(2), []
        else:
            body.append(line)
    result.append((heading, "\n".join(body).strip()))
    return result


def _first_paragraph(body: str) -> str:
    for para in body.split("\n"):
        if len(para.split()) >= 4 and para.rstrip()[-1:] in ".!?\"')":
            return para.strip()
    return ""


def _good_answer(answer: str) -> bool:
    return 4 <= len(answer.split()) <= 80


def article_to_qa(title: str, text: str, max_sections: int = 3) -> Iterator[dict]:
    """Q&A records from one article by the rule above.

    >>> list(article_to_qa("Albedo", "Albedo is the fraction of light that a surface reflects."))
    [{'question': 'What is Albedo?', 'answer': 'Albedo is the fraction of light that a surface reflects.', 'title': 'Albedo'}]
    """
    title = title.strip()
    if not re.search(r"[^\W\d_]", title):
        return
    parts = _sections(text)
    lead = sentences(_first_paragraph(parts[0][1]))
    if lead:
        first = lead[0]
        head = first[: max(len(title) + 40, 80)]
        if _DEFINES.search(head) and _good_answer(first):
            yield {"question": f"What is {title}?", "answer": first, "title": title}
        else:
            answer = " ".join(lead[:2])
            if _good_answer(answer):
                yield {"question": f"Tell me about {title}.", "answer": answer, "title": title}
    used = 0
    for heading, body in parts[1:]:
        if used >= max_sections:
            break
        if heading.lower() in SKIP_SECTIONS or not re.search(r"[^\W\d_]", heading):
            continue
        first = sentences(_first_paragraph(body))
        if first and _good_answer(first[0]):
            question = f"What about the {heading.lower() if heading.istitle() and ' ' not in heading else heading} of {title}?"
            yield {"question": question, "answer": first[0], "title": title}
            used += 1
