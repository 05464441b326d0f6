"""dtl.data.wikipedia: the shared enwiki excerpt read and cleaned, and broken dumps."""

from __future__ import annotations

import bz2
import re
import tracemalloc

import pytest
from data_helpers import REMNANTS

from dtl.data import wikipedia
from dtl.data.wikipedia import iter_pages, iter_wikipedia
from dtl.errors import DtlError

KNOWN_SENTENCES = {
    "Anarchism": "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions.",
    "Alabama": "Alabama is a state located in the southeastern region of the United States.",
    "Abraham Lincoln": "Abraham Lincoln (February 12, 1809 – April 15, 1865) was the 16th President of the United "
    "States, serving from March 1861 until his assassination in April 1865.",
    "Autism": "Parents usually notice signs in the first two years of their child's life.",
}


def _raw_articles(path) -> list[str]:
    """Titles of namespace-0, non-redirect pages, read from the XML with plain regexes."""
    xml = bz2.decompress(path.read_bytes()).decode("utf-8")
    pages = re.findall(r"<page>(.*?)</page>", xml, re.S)
    return [
        re.search(r"<title>(.*?)</title>", p).group(1)
        for p in pages
        if "<ns>0</ns>" in p and "<redirect" not in p
    ]


def test_the_106_articles_come_out(enwiki, enwiki_path):
    records, stats = enwiki
    raw = _raw_articles(enwiki_path)
    assert len(raw) == 106  # the README's count: 206 pages, 100 redirects
    assert (stats["pages"], stats["redirects"], stats["failed"]) == (206, 100, 0)
    # Disambiguation pages are articles too, but dropped by design (and counted).
    assert stats["articles"] + stats["disambiguation"] == 106
    assert stats["disambiguation"] == 8
    kept = [
        t
        for t in raw
        if t not in {"Alien", "Ada", "Aa River"} and not t.endswith("(disambiguation)")
    ]
    assert [r["title"] for r in records] == kept


def test_no_markup_remnants(enwiki):
    records, _ = enwiki
    counts = {m: sum(r["text"].count(m) for r in records) for m in REMNANTS}
    assert counts == dict.fromkeys(REMNANTS, 0)
    text = "\n".join(r["text"] for r in records)
    for leftover in (
        "thumb|",
        "Category:",
        "__TOC__",
        "<!--",
        "&amp;",
        "&nbsp;",
        "http://",
        "https://",
    ):
        assert leftover not in text
    assert "\n\n" not in text  # no run of blank lines


def test_known_sentences_survive_intact(enwiki):
    by_title = {r["title"]: r for r in enwiki[0]}
    for title, sentence in KNOWN_SENTENCES.items():
        assert sentence in by_title[title]["text"]
    assert by_title["Anarchism"]["text"].startswith(KNOWN_SENTENCES["Anarchism"])


def test_headings_are_plain_lines_and_reference_sections_go(enwiki):
    alabama = {r["title"]: r for r in enwiki[0]}["Alabama"]
    assert "Etymology" in alabama["sections"] and "\nEtymology\n" in alabama["text"]
    for dropped in ("References", "External links", "See also", "Further reading"):
        assert dropped not in alabama["sections"]
    assert all(s in alabama["text"].split("\n") for s in alabama["sections"])


def test_one_process_equals_two(enwiki, enwiki_path):
    stats: dict = {}
    first = []
    for record in iter_wikipedia(enwiki_path, processes=1, stats=stats):
        first.append(record)
        if len(first) == 12:
            break
    assert first == enwiki[0][:12]


def test_special_export_without_siteinfo_or_ns(tmp_path):
    path = tmp_path / "export.xml"
    path.write_text(
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/">'
        "<page><title>Widget</title><revision><text>'''Widget''' is a [[gadget]].</text></revision></page>"
        "<page><title>Talk:Widget</title><revision><text>chat</text></revision></page>"
        "<page><title>Gizmo</title><revision><text>#REDIRECT [[Widget]]</text></revision></page>"
        "</mediawiki>",
        encoding="utf-8",
    )
    stats: dict = {}
    assert list(iter_wikipedia(path, processes=1, stats=stats)) == [
        {"title": "Widget", "text": "Widget is a gadget.", "sections": []}
    ]
    assert (stats["other_namespace"], stats["redirects"]) == (1, 1)


def test_truncated_bz2(tmp_path, enwiki_path):
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(enwiki_path.read_bytes()[:400_000])
    with pytest.raises(
        DtlError, match=r"cut\.xml\.bz2: the \.bz2 stream ends early \(truncated download\?\)"
    ):
        list(iter_pages(cut))


def test_invalid_xml(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text(
        "<mediawiki>\n<page><title>A</title>\n<revision><text>x</text></page>\n</mediawiki>"
    )
    with pytest.raises(DtlError, match=r"bad\.xml: invalid XML at line 3, column \d+"):
        list(iter_pages(bad))
    other = tmp_path / "other.xml"
    other.write_text("<html><body>hello</body></html>")
    with pytest.raises(DtlError, match="not a MediaWiki XML export"):
        list(iter_pages(other))


def test_a_page_that_fails_is_counted_and_skipped(tmp_path, monkeypatch, capsys):
    real = wikipedia.clean_wikitext

    def fragile(text):
        if "EXPLODE" in text:
            raise RecursionError("maximum recursion depth exceeded")
        return real(text)

    monkeypatch.setattr(wikipedia, "clean_wikitext", fragile)
    path = tmp_path / "d.xml"
    pages = "".join(
        f"<page><title>{t}</title><ns>0</ns><revision><text>{body}</text></revision></page>"
        for t, body in (("One", "First page."), ("Bad", "EXPLODE"), ("Two", "Second page."))
    )
    path.write_text(f"<mediawiki>{pages}</mediawiki>")
    stats: dict = {}
    records = list(iter_wikipedia(path, processes=1, stats=stats))
    assert [r["title"] for r in records] == ["One", "Two"]
    assert (stats["failed"], stats["failed_titles"]) == (1, ["Bad"])
    assert "skipped page 'Bad': RecursionError" in capsys.readouterr().err


def test_memory_stays_flat_however_large_the_dump(tmp_path):
    body = "Lorem ipsum [[dolor]] sit amet, {{cite|x}} consectetur. " * 40
    path = tmp_path / "big.xml"
    with open(path, "w", encoding="utf-8") as f:
        f.write("<mediawiki>")
        for i in range(4000):
            f.write(
                f"<page><title>P{i}</title><ns>0</ns><revision><text>{body}</text></revision></page>"
            )
        f.write("</mediawiki>")
    assert path.stat().st_size > 9_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_pages(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 4000
    assert peak < 1_000_000  # a few pages at a time, not the 9 MB document
