"""dtl.data.wikimarkup: one page's wikitext -> plain text and section headings, by hand."""

from __future__ import annotations

import random
import re

import pytest

from dtl.data import wikimarkup
from dtl.data.wikimarkup import _tidy, _tidy_lines, clean_wikitext, prepass


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


# --- the fast paths give what the parser's path gives ----------------------------------------

LINK_CASES = [
    "A [[cat]] sat.",
    "A [[Felis catus|cat]] sat on [[ mat ]] and [[rug| the rug ]].",
    "''[[Iliad|the Iliad]]'' and '''[[Odyssey]]''' and [[Alzheimer's disease]].",
    "'''[[Foo']]''' then [[a|''b'']] then [[a|b'']]''x''.",
    "[[a|]] [[a#b|c]] [[#Section]] [[a|b|c]] [[ |x]]",
    "* [[List]] item\n# [[Numbered]]\n; [[Term]] : [[Def]]\n[[*not a list]]\n[[#a]] b",
    "<nowiki>[[kept as text]]</nowiki> and [[gone|shown]]",
    "[[[tri]]] and [[a]]] and [[[b]] and [[fr:Paris]] [[Category:X]] [[:en:Y|z]]",
    "[[a|see http://example.org now]] [[a|b----c]] [[a|__NOTOC__]] [[a|~~~~]]",
    "=[[Heading link]]=\n== [[A|Real]] heading ==\ntext under it\n[[----]]",
    "[[a|b&amp;c]] [[a&b]] [[a|<b>bold</b>]] [[a|{{x}}]] [[a\nb]] [[a|b\nc]]",
]


@pytest.mark.parametrize("wikitext", LINK_CASES)
def test_plain_links_replaced_early_read_as_the_parser_reads_them(wikitext, monkeypatch):
    fast = clean_wikitext(wikitext)
    monkeypatch.setattr(wikimarkup, "_PLAIN_LINK", re.compile(r"(?!x)x"))  # never matches
    assert fast == clean_wikitext(wikitext)


def test_the_fast_paths_change_no_real_article(monkeypatch):
    """Real pages of the embedded dump excerpt: the same text with the fast paths (plain links
    before the parse, tidying all lines at once) as with the parser and a line at a time."""
    from dtl.corpus import corpus_files
    from dtl.data.wikipedia import iter_pages

    texts = [p["text"] for p in iter_pages(corpus_files()[0])][::4]
    fast = [clean_wikitext(t) for t in texts]
    monkeypatch.setattr(wikimarkup, "_PLAIN_LINK", re.compile(r"(?!x)x"))
    monkeypatch.setattr(wikimarkup, "_tidy_lines", lambda lines: [_tidy(x) for x in lines])
    assert fast == [clean_wikitext(t) for t in texts]


def test_tidying_all_lines_at_once_equals_a_line_at_a_time():
    lines = [
        "a  b\t\tc\u00a0d \u2009 e",
        "( , born 1900 ; )",
        "(  ) and [ ] and ( ; ) and (.,)",
        "x , ) y (; z",
        "end ,",
        "  ( ",
        " ) start",
        "''Iliad'''s hero '''bold''' it''s",
        "\x00mark\x00 and\x85(\u2028)",
        "",
        "word .",
    ]
    assert _tidy_lines(lines) == [_tidy(x) for x in lines]
    # and the lone-space-sparing run rule is the plain one
    for text in ("a  b", "a \tb", "\u00a0a", "a b", " ", "  ", "a\u200b\u200bb", "a \u2009 b"):
        assert wikimarkup._SPACES.sub(" ", text) == re.sub(r"[ \t\u00a0\u2009\u200b]+", " ", text)


def test_the_fast_rules_equal_their_plain_forms_on_random_markup():
    """The rules as first written, one character at a time, are the oracle for the faster
    forms (possessive runs, "[[" searched before its look-behind, str.replace for spaces)."""
    template = re.compile(r"\{\{(?:[^{}]|\{(?!\{)|\}(?!\}))*\}\}")
    table = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
    link = re.compile(r"(?<!\[)\[\[([^\[\]{}<>|\n&:=]+)(?:\|([^\[\]{}<>|\n&=]*))?\]\](?!\])")
    spaces = re.compile(r"[ \t\u00a0\u2009\u200b]+")
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("{{}}||[[]]ab: \n\t\u00a0=") for _ in range(rng.randint(0, 40)))
        assert wikimarkup._remove_innermost(wikimarkup._TEMPLATE, text, "T") == (
            wikimarkup._remove_innermost(template, text, "T")
        )
        assert wikimarkup._remove_innermost(wikimarkup._TABLE, text, "T") == (
            wikimarkup._remove_innermost(table, text, "T")
        )
        assert wikimarkup._PLAIN_LINK.sub(r"<\1>", text) == link.sub(r"<\1>", text)
        assert wikimarkup._squeeze_spaces(text) == spaces.sub(" ", text)


# Markup the token reader (`_parse_text`) reads itself or hands to mwparserfromhell's Builder.
TOKEN_CASES = [
    "'''Bold''' and ''italic'' and '''''both''''' and ''unclosed\nnext line",
    "* item ''one''\n** nested\n# number\n; term : definition\n----\nafter",
    "== A ''heading'' ==\ntext\n=== [[Link|Sub]] &amp; more ===\n= top =",
    "a<br>b<br/>c</br>d<span class=\"x\" style='y' flag>kept</span><div\nid=a>block</div>",
    "<small>small <b>bold <i>both</i></b></small> <sup>2</sup> <ref name=a>r</ref> <math>x</math>",
    "<gallery>\nFile:X.jpg|cap\n</gallery> <nowiki>''not bold''</nowiki> <pre>[[x]]</pre>",
    "[http://example.org shown text] [http://example.org] http://bare.example.org/x",
    "&nbsp;&#8212;&#x2014;&amp;&bogus; {{template|a=''b''}} {{{argument|d}}} <!-- c -->",
    "{| class=wikitable\n|-\n! head\n|-\n| ''cell'' || [[cell]]\n|}",
    "<{{x}}>odd tag name</{{x}}> <span {{y}}>attr template</span> <b>unclosed",
    "[[File:X.jpg|thumb|A [[cat]]]] [[a|b]] [[fr:Chat]] [[:Category:C|c]] ''[[a|''b'']]''",
]


@pytest.mark.parametrize("wikitext", TOKEN_CASES)
def test_the_token_reader_gives_the_builders_text(wikitext):
    """The oracle: mwparserfromhell's own tree of the same text, walked node by node."""
    tree = wikimarkup.mwp.parse(wikitext, skip_style_tags=False)
    assert wikimarkup._parse_text(wikitext) == wikimarkup._walk(tree)


def test_the_token_reader_changes_no_real_page():
    """Every page of the embedded excerpt, raw (templates, tables, refs: the Builder's paths)
    and pre-passed (what the cleaning parses): the same text as the Builder's tree."""
    from dtl.corpus import corpus_files
    from dtl.data.wikipedia import iter_pages

    for page in list(iter_pages(corpus_files()[0]))[::3]:
        for text in (page["text"], prepass(page["text"])):
            tree = wikimarkup.mwp.parse(text, skip_style_tags=False)
            assert wikimarkup._parse_text(text) == wikimarkup._walk(tree), page["title"]


# Pieces of markup, joined at random: unbalanced and nested quotes, tags, links, templates,
# tables, headings and lists, so the tokens come in every order the tokenizer makes.
MARKUP_PIECES = (
    ["'''", "''", "[[", "]]", "[[a|b]]", "[[File:x.jpg|c]]", "{{", "}}", "{{cite|x}}", "{|", "|}"]
    + ["|-", "||", "|", "\n", "\n*", "\n#", "\n;", "\n:", "\n----\n", "\n== H ==\n", "=="]
    + ["\n=== ''I'' ===\n", "<br>", "<br/>", "</br>", "<b>", "</b>", "<span class=x>", "</span>"]
    + ["<ref>", "</ref>", "<ref name=a/>", "<!--", "-->", "&amp;", "&nbsp;", "&#x41;", "&bogus;"]
    + ["[http://x.org t]", "http://y.org", "[", "]", "<nowiki>", "</nowiki>", "<math>", "</math>"]
    + [" ", "\t", "(", ")", ",", "word", "s", "=", "{{{a}}}", "<div\nid=a>", "</div>", "<{{x}}>"]
    + ["<span {{y}}>", "[[a|''b'']]", "[[:Category:c|d]]", "[[fr:z]]"]
)


def test_the_token_reader_gives_the_builders_text_on_random_markup():
    rng = random.Random(0)
    for _ in range(1500):
        text = "".join(rng.choice(MARKUP_PIECES) for _ in range(rng.randint(1, 50)))
        tree = wikimarkup.mwp.parse(text, skip_style_tags=False)
        assert wikimarkup._parse_text(text) == wikimarkup._walk(tree), repr(text)
