"""Wikipedia markup -> plain text: one page's wikitext cleaned to lines and section headings.

>>> clean_wikitext("'''Albedo''' is [[light|light]] reflected.{{cite web|x}}<ref>r</ref>")[0]
'Albedo is light reflected.'

The cleaning, per page (`dtl.data.wikipedia` runs it on all cores over a dump):
  1. a cheap regex pre-pass removes what needs no parsing and dominates parse time:
     comments, magic words, `<ref>`s, nested `{{templates}}` and `{| tables |}` (innermost first);
  2. `mwparserfromhell` tokenizes the rest and a walk keeps visible text: a link's text,
     tags' contents; it drops files/images, categories, interlanguage links, leftover
     templates and tags like `<gallery>`, and decodes HTML entities (text, tags and headings
     are read off the tokens, the rest built into nodes by mwparserfromhell: `_parse_text`);
  3. headings become plain lines of their own (listed in the record's "sections"); the
     See also / References / External links ... sections are dropped; no blank lines.
"""

from __future__ import annotations

import html
import re
from typing import Any

import mwparserfromhell as mwp
from mwparserfromhell import nodes
from mwparserfromhell.definitions import PARSER_BLACKLIST
from mwparserfromhell.parser import Parser, ParserError
from mwparserfromhell.parser import tokens as tk
from mwparserfromhell.parser.builder import Builder

from dtl.data.qa import SKIP_SECTIONS

# --- 1. the pre-pass ----------------------------------------------------------------------
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")  # __TOC__, __NOTOC__, ...
_REF = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?(?:</ref\s*>|$)", re.S | re.I)
_DROP_TAG_BLOCK = re.compile(
    r"<(gallery|math|timeline|imagemap|score|syntaxhighlight|source|references|chem|graph|mapframe)\b[^>]*?(?:/>|>.*?</\1\s*>)",
    re.S | re.I,
)
# Innermost: no {{ or }} (no {| or |}) inside. Runs of plain characters are taken at once, and
# possessively: the loop cannot step over a }} (|}), so giving back could find no other match.
_TEMPLATE = re.compile(r"\{\{(?:[^{}]++|\{(?!\{)|\}(?!\}))*+\}\}")
_TABLE = re.compile(r"\{\|(?:[^{|]++|\{(?!\|)|\|(?!\}))*+\|\}")
_FILE_LINK = re.compile(r"\[\[\s*(?:file|image|category)\s*:", re.I)
_BRACKETS = re.compile(r"\[\[|\]\]")
_PARAM_PIPE = re.compile(r"\|(?![^\[]*\]\])")  # a pipe that is not inside a [[link|text]]
# Inline templates whose text is part of the sentence (the rest carry no prose).
_KEEP_TEMPLATE = re.compile(
    r"^\s*(lang|lang-[a-z-]+|nowrap|nobr|transl|convert|cvt|sic|ill|small|smaller|em|nihongo|iast)\s*$",
    re.I,
)


def _remove_innermost(pattern: re.Pattern, text: str, repl: Any = "") -> str:
    while True:
        text, n = pattern.subn(repl, text)
        if not n:
            return text


def _template_text(match: re.Match) -> str:
    """The visible text of the few inline templates worth keeping; "" for the rest."""
    parts = [p for p in _PARAM_PIPE.split(match.group(0)[2:-2]) if "=" not in p]
    if len(parts) < 2 or not _KEEP_TEMPLATE.match(parts[0]):
        return ""
    name = parts[0].strip().lower()
    if name in ("lang", "transl"):
        return parts[-1].strip() if len(parts) >= 3 else ""
    if name in ("convert", "cvt"):
        values = [p.strip() for p in parts[1:4]]
        if len(values) >= 3 and values[1] in ("-", "–", "to", "and"):
            joiner = "–" if values[1] in ("-", "–") else f" {values[1]} "
            return f"{values[0]}{joiner}{values[2]}"
        return " ".join(values[:2])
    return parts[1].strip()


def _drop_file_links(text: str) -> str:
    """Remove [[File:...]], [[Image:...]], [[Category:...]], captions' nested links included."""
    out, pos = [], 0
    for start in _FILE_LINK.finditer(text):
        if start.start() < pos:
            continue
        depth, end = 0, len(text)
        for bracket in _BRACKETS.finditer(text, start.start()):
            depth += 1 if bracket.group() == "[[" else -1
            if depth == 0:
                end = bracket.end()
                break
        out.append(text[pos : start.start()])
        pos = end
    out.append(text[pos:])
    return "".join(out)


# A plain [[title]] or [[title|text]]: no markup inside, nothing next to it that could make
# the brackets mean something else. Most of a page's links; the parser gets the rest.
# "[[" first, then "not after a [" looked back: the search then jumps from "[[" to "[[".
_PLAIN_LINK = re.compile(r"\[\[(?<!\[\[\[)([^\[\]{}<>|\n&:=]+)(?:\|([^\[\]{}<>|\n&=]*))?\]\](?!\])")
# Tags whose contents the parser leaves unparsed (<nowiki>, <pre>, ...): a link inside stays text.
_UNPARSED_TAG = re.compile(r"<\s*(?:" + "|".join(map(re.escape, PARSER_BLACKLIST)) + r")\b", re.I)
_RISKY_TEXT = re.compile(r"://|__|~~~|----|''")


def _plain_link_text(match: re.Match) -> str:
    """The visible text of a plain link, the same as the parser's walk gives (`_link_text`)."""
    title, text = match.group(1), match.group(2)
    shown = title.strip() if text is None else text
    if (
        not title.strip()
        or shown[:1] in ("*", "#", ";", " ", "-", "'")
        or shown[-1:] == "'"  # next to bold/italic quotes it would change them
        or _RISKY_TEXT.search(shown)
    ):
        return match.group(0)  # let the parser decide
    return shown


def prepass(text: str) -> str:
    """Remove comments, refs, block tags, templates, tables and file links (nested) by regex,
    and replace plain links by their text (the parse is then far smaller)."""
    text = _MAGIC_WORD.sub("", _COMMENT.sub("", text))
    text = _REF.sub("", text)
    text = _DROP_TAG_BLOCK.sub("", text)
    text = _remove_innermost(_TEMPLATE, text, _template_text)
    text = _remove_innermost(_TABLE, text)
    text = _drop_file_links(text)
    if "[[" in text and not _UNPARSED_TAG.search(text):
        text = _PLAIN_LINK.sub(_plain_link_text, text)
    return text


# --- 2. the parse and walk ------------------------------------------------------------------
DROP_LINK_NAMESPACES = {
    "file",
    "image",
    "media",
    "category",
    "wikipedia",
    "wp",
    "template",
    "help",
    "portal",
    "special",
    "user",
}
DROP_TAGS = {
    "ref",
    "references",
    "gallery",
    "math",
    "timeline",
    "imagemap",
    "score",
    "syntaxhighlight",
    "source",
    "table",
    "chem",
    "graph",
    "mapframe",
    "templatedata",
    "noinclude",
    "style",
    "script",
}
_INTERLANG = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")


def _link_text(link: nodes.Wikilink) -> str:
    title = str(link.title).strip()
    prefix = title.split(":", 1)[0].strip().lower() if ":" in title else ""
    if prefix and not title.startswith(":"):
        if prefix in DROP_LINK_NAMESPACES or _INTERLANG.match(prefix):
            return ""
    if link.text is not None:
        return _walk(link.text)
    return _walk(mwp.parse(title.lstrip(":")))


def _walk(code: Any) -> str:
    """The visible text of parsed wikicode."""
    return "".join([_node_text(node) for node in code.nodes])


def _node_text(node: Any) -> str:
    """The visible text of one parsed node."""
    if isinstance(node, nodes.Text):
        return node.value
    if isinstance(node, nodes.Wikilink):
        return _link_text(node)
    if isinstance(node, nodes.Heading):
        return _heading_text(node.level, _walk(node.title))
    if isinstance(node, nodes.Tag):
        name = str(node.tag)
        return _tag_text(name, node.wiki_markup, node.self_closing, _walk(node.contents))
    if isinstance(node, nodes.ExternalLink):
        return _walk(node.title) if node.title is not None else ""
    if isinstance(node, nodes.HTMLEntity):
        return node.normalize()
    return ""  # Template, Comment, Argument: no visible text


def _heading_text(level: int, title: str) -> str:
    return f"\n\x00{level}\x00{title.strip()}\n"  # marked; _finish turns it into a line


def _tag_text(name: str, wiki_markup: str | None, self_closing: bool, contents: str) -> str:
    """A tag's visible text, from its name's source, its markup and its contents' text."""
    name = name.strip().lower()
    if name in DROP_TAGS:
        return ""
    if name == "br":
        return "\n"
    if wiki_markup in ("*", "#", ";", ":"):  # list markers: the item's text stays
        return contents
    if wiki_markup == "----":
        return "\n"
    return "" if self_closing else contents


# The same text as `_walk(mwp.parse(text, skip_style_tags=False))`, read straight off the
# parser's tokens: mwparserfromhell's tokenizer is C, but its Builder, which makes a Python
# object of every node, was most of a page's parse time. Text, tags (bold, italics, list
# items, HTML) and headings, nearly all of a pre-passed page, are read here in the Builder's
# own order of tokens; any other node (a link the pre-pass left, an entity, an external link)
# is built by mwparserfromhell's Builder from the same token list and walked as before.
_TOKENIZER = Parser()._tokenizer


def _parse_text(text: str) -> str:
    """The visible text of wikitext: `_walk(mwp.parse(text, skip_style_tags=False))`."""
    tokens = _TOKENIZER.tokenize(text, 0, False)
    tokens.reverse()  # popped from the end, as the Builder does
    builder = Builder()
    builder._tokens = tokens  # the fallback builds its nodes off the same list
    out = []
    while tokens:
        token = tokens.pop()
        # Text, most tokens, read here: a call saved per token
        out.append(token["text"] if type(token) is tk.Text else _token_text(token, tokens, builder))
    return "".join(out)


def _token_text(token: Any, tokens: list, builder: Builder) -> str:
    """The visible text of the node that `token` opens (its other tokens are popped)."""
    kind = type(token)
    if kind is tk.Text:
        return token["text"]
    if kind is tk.TagOpenOpen:
        return _tag_tokens(token, tokens, builder)
    if kind is tk.HeadingStart:
        title = []
        while tokens:
            token_in = tokens.pop()
            if type(token_in) is tk.HeadingEnd:
                return _heading_text(int(token["level"]), "".join(title))
            title.append(_token_text(token_in, tokens, builder))
        raise ParserError("_handle_heading() missed a close token")
    return _node_text(builder._handle_token(token))


def _tag_tokens(opening: Any, tokens: list, builder: Builder) -> str:
    """A tag's text from its tokens, following `Builder._handle_tag` token by token: its name
    (source text), attributes (skipped), contents (visible text), closing name (skipped)."""
    name = contents = ""
    part: list[str] = []  # the name's source, then the contents' text, then the closing name
    in_contents = False
    while tokens:
        token = tokens.pop()
        kind = type(token)
        if kind is tk.Text:  # the name's source or the contents' text alike
            part.append(token["text"])
        elif kind is tk.TagAttrStart:
            builder._handle_attribute(token)  # consumes the attribute: no visible text
        elif kind is tk.TagCloseOpen:
            name, part, in_contents = "".join(part), [], True
        elif kind is tk.TagOpenClose:
            contents, part, in_contents = "".join(part), [], False
        elif kind is tk.TagCloseSelfclose or kind is tk.TagCloseClose:
            self_closing = kind is tk.TagCloseSelfclose
            if self_closing:
                name = "".join(part)
            return _tag_text(name, opening.get("wiki_markup") or None, self_closing, contents)
        elif in_contents:
            part.append(_token_text(token, tokens, builder))
        else:  # markup in a tag's name: its source, as str() of the Builder's node gives it
            part.append(str(builder._handle_token(token)))
    raise ParserError("_handle_tag() missed a close token")


# --- 3. lines and sections ------------------------------------------------------------------
# A run of spaces -> one space; a lone " " is left alone (the same result, far fewer matches).
_SPACES = re.compile(r"(?: [ \t\u00a0\u2009\u200b]|[\t\u00a0\u2009\u200b])[ \t\u00a0\u2009\u200b]*")
_OTHER_SPACES = ("\t", "\u00a0", "\u2009", "\u200b")


def _squeeze_spaces(text: str) -> str:
    """`_SPACES.sub(" ", text)` by str.replace, twice as fast: every run of those spaces (a
    lone tab or no-break space too) becomes one " "."""
    for space in _OTHER_SPACES:
        if space in text:
            text = text.replace(space, " ")
    while "  " in text:
        text = text.replace("  ", " ")
    return text


_EMPTY_PARENS = re.compile(r"\(\s*[,;:.\s]*\)|\[\s*\]")
_PAREN_LEAD = re.compile(r"\(\s*[,;:]\s*")
_PAREN_TAIL = re.compile(r"\s*[,;:]\s*\)")
_SPACE_PUNCT = re.compile(r"\s+([,.;:!?)])")
# Bold/italic quotes the parser left (unbalanced, or spanning lines), shown as MediaWiki
# shows them: ''Iliad'''s -> Iliad's; any other run of 2+ apostrophes -> nothing.
_QUOTE_S = re.compile(r"'{2,}(?=s\b)")
_QUOTES = re.compile(r"'{2,}")
_HEADING_MARK = re.compile(r"^\x00(\d)\x00(.*)$")


def _finish(text: str) -> tuple[str, list[str]]:
    entries: list[
        tuple[bool, Any]
    ] = []  # (True, a heading's title) or (False, a body line's number)
    body: list[str] = []
    sections: list[str] = []
    skip_level = 0  # > 0 while inside a dropped section
    for raw in text.split("\n"):
        heading = _HEADING_MARK.match(raw.strip()) if "\x00" in raw else None
        if heading:
            level, title = int(heading.group(1)), _tidy(heading.group(2))
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in SKIP_SECTIONS else 0
            if not skip_level and title:
                entries.append((True, title))
                sections.append(title)
            continue
        if not skip_level:
            entries.append((False, len(body)))
            body.append(raw)
    tidied = _tidy_lines(body)
    lines: list[str] = []
    for is_heading, value in entries:
        line = value if is_heading else tidied[value]
        if is_heading or _WORD.search(line):
            lines.append(line)
    # A heading left with nothing under it (its body was all templates) is dropped.
    headings = set(sections)
    kept = [
        ln
        for i, ln in enumerate(lines)
        if not (ln in headings and (i + 1 == len(lines) or lines[i + 1] in headings))
    ]
    kept_set = set(kept)
    return "\n".join(kept), [s for s in sections if s in kept_set]


def _tidy(line: str) -> str:
    """One line's spaces, quotes and punctuation put right."""
    line = _QUOTES.sub("", _QUOTE_S.sub("'", line.replace("\x00", "")))
    line = _squeeze_spaces(line)
    line = _EMPTY_PARENS.sub("", line)
    line = _PAREN_LEAD.sub("(", line)
    line = _PAREN_TAIL.sub(")", line)
    line = _SPACE_PUNCT.sub(r"\1", line)
    return _squeeze_spaces(line).strip()


# `_tidy`'s rules with `\s` made "a space but not a newline", so that each runs once over all
# of a page's lines joined (one pass in C instead of one call a line), with the same result.
_EMPTY_PARENS_LINES = re.compile(r"\([^\S\n]*(?:[,;:.]|[^\S\n])*\)|\[[^\S\n]*\]")
_PAREN_LEAD_LINES = re.compile(r"\([^\S\n]*[,;:][^\S\n]*")
_PAREN_TAIL_LINES = re.compile(r"[^\S\n]*[,;:][^\S\n]*\)")
_PAREN_TAIL_HINT = re.compile(r"[,;:][^\S\n]*\)")  # what every _PAREN_TAIL_LINES match ends with
# (a space, then any more: a first set the search skips to, ~1.3x faster than `[^\S\n]+`)
_SPACE_PUNCT_LINES = re.compile(r"[^\S\n][^\S\n]*([,.;:!?)])")
_WORD = re.compile(r"\w")


def _tidy_lines(lines: list[str]) -> list[str]:
    """`[_tidy(line) for line in lines]`, computed over the joined lines at once."""
    text = "\n".join(lines).replace("\x00", "")
    if "''" in text:  # most pages: the parser took every bold and italic
        text = _QUOTES.sub("", _QUOTE_S.sub("'", text))
    text = _squeeze_spaces(text)
    text = _EMPTY_PARENS_LINES.sub("", text)
    text = _PAREN_LEAD_LINES.sub("(", text)
    if _PAREN_TAIL_HINT.search(text):  # rare; the rule's leading spaces make a full scan slow
        text = _PAREN_TAIL_LINES.sub(")", text)
    text = _SPACE_PUNCT_LINES.sub(r"\1", text)
    return [line.strip() for line in _squeeze_spaces(text).split("\n")]


def clean_wikitext(text: str) -> tuple[str, list[str]]:
    """(plain text, section headings) of one page's wikitext."""
    return _finish(html.unescape(_parse_text(prepass(text))))
