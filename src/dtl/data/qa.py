"""The Q&A template, and a deterministic rule that turns articles into Q&A pairs.

>>> format_qa("Who wrote Hamlet?", "William Shakespeare")
'Question: Who wrote Hamlet?\\nAnswer: William Shakespeare'
>>> qa_prompt("Who wrote Hamlet?")
'Question: Who wrote Hamlet?\\nAnswer:'

Each training example is `format_qa(...)` followed by the end-of-text token. A model asked
`qa_prompt(q)` continues with " answer" and stops at end-of-text, or at one of `QA_STOPS` (the
template's markers, in case it runs on into another example); `dtl ask`, `dtl chat`, the
server's chat completions and the web page all stop there:

>>> qa_stops(["."])
('\\nQuestion:', '\\nAnswer:', '.')
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from dtl.errors import DtlError

QA_TEMPLATE = "Question: {question}\nAnswer: {answer}"
QA_STOP = "\nQuestion:"
# Where a Q&A answer ends besides end-of-text: the template's next question, or a second
# "Answer:" line (small models run on into both). The one definition every Q&A caller uses.
QA_STOPS: tuple[str, ...] = (QA_STOP, "\nAnswer:")


def qa_stops(extra: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The Q&A stop strings followed by a caller's own (`--stop`, the body's `stop`)."""
    return (*QA_STOPS, *(s for s in extra if s not in QA_STOPS))


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
# The rule (docs/data.md shows real pairs). An article titled T (without a trailing
# "(disambiguator)") whose text has a lead and headed sections gives:
#   1. from the lead's first sentence S, when S names T before its verb ("T (...) is/was ..."):
#      "Who was T?" / "Who is T?" (S gives a lifespan or "born" before its verb; by the verb),
#      else "What is T?" / "What was T?" (by S's verb)  ->  S;
#      otherwise "Tell me about T."  ->  the lead's first two sentences;
#   2. for each of the first `max_sections` usable section headings H: a fixed question for
#      common headings (History -> "What is the history of T?", Etymology -> "Where does the
#      name T come from?", ...), else "What does the article on T say about H?" (H's first
#      letter lowered when the article uses that word in lower case)  ->  the section's
#      first sentence.
# Answers are 4..80 words and start like a sentence; titles need a letter; "See also",
# "References" and the like are never used. So there is no "What is The?".

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
    "primary sources",
    "secondary sources",
}
SECTION_QUESTIONS = {
    "history": "What is the history of {t}?",
    "etymology": "Where does the name {t} come from?",
    "name": "Where does the name {t} come from?",
    "names": "Where does the name {t} come from?",
    "naming": "Where does the name {t} come from?",
    "etymology and terminology": "Where does the name {t} come from?",
    "geography": "What is the geography of {t} like?",
    "climate": "What is the climate of {t} like?",
    "economy": "What is the economy of {t} like?",
    "demographics": "What are the demographics of {t}?",
    "early life": "What was the early life of {t} like?",
    "biography": "What is the life story of {t}?",
    "life": "What is the life story of {t}?",
    "career": "What was the career of {t}?",
    "death": "How did {t} die?",
    "legacy": "What is the legacy of {t}?",
    "background": "What is the background of {t}?",
    "plot": "What is the plot of {t}?",
    "synopsis": "What is the plot of {t}?",
    "reception": "How was {t} received?",
    "overview": "What is an overview of {t}?",
    "definition": "How is {t} defined?",
    "origins": "What are the origins of {t}?",
    "origin": "What is the origin of {t}?",
    "characteristics": "What are the characteristics of {t}?",
    "culture": "What is the culture of {t} like?",
    "politics": "What are the politics of {t} like?",
    "government": "How is {t} governed?",
    "education": "What is education like in {t}?",
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_ABBREV = re.compile(r"\b(?:[A-Z]|Mr|Mrs|Dr|St|Jr|Sr|vs|c|ca|e\.g|i\.e|etc|No|U\.S)\.$")
_VERB = re.compile(r"\b(is|was|are|were|refers to|has been)\b")
_LIFESPAN = re.compile(r"\(([^()]*\b\d{1,4}\b[^()]*[–-][^()]*\b\d{1,4}\b[^()]*)\)")
_HEADING = re.compile(r"^(={1,6})\s*(.+?)\s*\1\s*$")


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph at sentence ends, not after initials or common abbreviations."""
    out: list[str] = []
    for part in _SENTENCE_END.split(paragraph.strip()):
        if out and _ABBREV.search(out[-1]):
            out[-1] = f"{out[-1]} {part}"
        else:
            out.append(part)
    return [s.strip() for s in out if s.strip()]


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs from text whose heading lines are `== H ==`; the lead has ""."""
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
    return 4 <= len(answer.split()) <= 80 and (
        answer[:1].isupper() or answer[:1].isdigit() or answer[:1] in "\"'("
    )


def _lead_question(name: str, first: str) -> str | None:
    """The question S answers, when S (the lead's first sentence) defines `name`."""
    verb = _VERB.search(first)
    if verb is None or verb.start() > len(name) + 120:
        return None
    subject = first[: verb.start()]
    if name.lower() not in subject.lower():
        return None
    if _LIFESPAN.search(subject) or re.search(r"\(born\b", subject):
        return f"Who {'was' if verb.group(1) == 'was' else 'is'} {name}?"
    return f"What {'was' if verb.group(1) in ('was', 'were') else 'is'} {name}?"


def _section_question(name: str, heading: str, text: str) -> str:
    fixed = SECTION_QUESTIONS.get(heading.lower())
    if fixed:
        return fixed.format(t=name)
    # "Early career" -> "early career", but "Europe" stays: lower the first letter only when
    # the article itself uses the word in lower case.
    lowered = heading[0].lower() + heading[1:]
    if lowered != heading and re.search(rf"\b{re.escape(lowered.split()[0])}\b", text):
        heading = lowered
    return f"What does the article on {name} say about {heading}?"


def article_to_qa(title: str, text: str, max_sections: int = 3) -> Iterator[dict]:
    """Q&A records from one article by the rule above (headings as `== H ==` lines).

    >>> list(article_to_qa("Albedo", "Albedo is the fraction of light that a surface reflects."))
    [{'question': 'What is Albedo?', 'answer': 'Albedo is the fraction of light that a surface reflects.', 'title': 'Albedo'}]
    """
    name = re.sub(r"\s*\([^()]*\)$", "", title.strip()) or title.strip()
    if not re.search(r"[^\W\d_]", name):
        return
    parts = _sections(text)
    lead = sentences(_first_paragraph(parts[0][1]))
    if lead:
        question = _lead_question(name, lead[0]) if _good_answer(lead[0]) else None
        if question:
            yield {"question": question, "answer": lead[0], "title": title}
        elif _good_answer(" ".join(lead[:2])):
            yield {
                "question": f"Tell me about {name}.",
                "answer": " ".join(lead[:2]),
                "title": title,
            }
    used = 0
    for heading, body in parts[1:]:
        if used >= max_sections:
            break
        if heading.lower() in SKIP_SECTIONS or not re.search(r"[^\W\d_]", heading):
            continue
        first = sentences(_first_paragraph(body))
        if first and _good_answer(first[0]):
            yield {
                "question": _section_question(name, heading, text),
                "answer": first[0],
                "title": title,
            }
            used += 1
