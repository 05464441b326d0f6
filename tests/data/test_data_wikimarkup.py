"""dtl.data.wikimarkup: one page's wikitext -> plain text and section headings, by hand."""

from __future__ import annotations

import pytest

from dtl.data.wikimarkup import clean_wikitext, prepass


def test_cleaning_by_hand():
    wikitext = (
        "{{Infobox thing|name={{nowrap|X}}|size=3}}'''Foo''' ({{lang|fr|le Foo}}) is a [[bar (baz)|bar]]"
        "<ref name=a>{{cite web|url=http://x}}</ref> in [[Qux]] &ndash; tall.<!-- hidden -->\n\n\n"
        "[[File:Foo.jpg|thumb|A [[bar]] at dusk]]\n"
        "{| class=wikitable\n|-\n| a || b\n|}\n"
        "== History ==\nIt was ''first'' seen in 1900.<ref>x</ref>\n"
        "== References ==\n{{reflist}}\n* Some book\n"
        "[[Category:Things]]\n[[de:Foo]]"
    )
    text, sections = clean_wikitext(wikitext)
    assert text == "Foo (le Foo) is a bar in Qux – tall.\nHistory\nIt was first seen in 1900."
    assert sections == ["History"]


def test_prepass_removes_what_needs_no_parsing():
    text = "a<!-- x -->b__NOTOC__c<ref name=x/>d<ref>e</ref>f{{a|{{b}}}}g{|\n|x\n|}h"
    assert prepass(text) == "abcdfgh"


@pytest.mark.parametrize(
    ("wikitext", "text"),
    [
        ("The word {{lang|fr|chat}} is {{nowrap|New York}}'s.", "The word chat is New York's."),
        ("It is {{cvt|3|mi}} wide.{{citation needed|date=May}}", "It is 3 mi wide."),
        ("A [[File:X.jpg|thumb|A [[cat]] on a [[mat|rug]]]] sits.", "A sits."),
        ("[[fr:Chat]][[Category:Cats]]Cats are [[:Category:Cats|felines]].", "Cats are felines."),
        (
            "''Iliad'''s hero (; born 1900) is [[Achilles]] .",
            "Iliad's hero (born 1900) is Achilles.",
        ),
        ("A&nbsp;B &amp; C<br>D", "A B & C\nD"),
    ],
)
def test_inline_markup_becomes_the_visible_text(wikitext, text):
    assert clean_wikitext(wikitext) == (text, [])


def test_reference_sections_go_with_their_subsections_and_empty_headings_go():
    wikitext = (
        "Lead.\n== See also ==\n* [[Other]]\n=== Sub ===\nHidden.\n"
        "== Empty ==\n{{main|X}}\n== Life ==\nShown."
    )
    assert clean_wikitext(wikitext) == ("Lead.\nLife\nShown.", ["Life"])
