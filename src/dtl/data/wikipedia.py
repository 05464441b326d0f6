"""Wikipedia XML dumps -> clean article records, streamed, cleaned on all cores.

>>> for rec in iter_wikipedia("enwiki-pages-articles1.xml.bz2"):   # doctest: +SKIP
...     print(rec["title"], rec["text"][:60])
Anarchism Anarchism is a political philosophy that advocates self-governed

>>> clean_wikitext("'''Albedo''' is [[light|light]] reflected.{{cite web|x}}<ref>r</ref>")[0]
'Albedo is light reflected.'

Reading: the standard library's `iterparse` over the (bz2) stream, so memory stays flat and
exports without `<siteinfo>` or `<ns>` still work. Kept: namespace-0 pages that are not
redirects or disambiguation pages. Cleaning, per page, in a process pool:
  1. a cheap regex pre-pass removes what needs no parsing and dominates parse time:
     comments, magic words, `<ref>`s, nested `{{templates}}` and `{| tables |}` (innermost first);
  2. `mwparserfromhell` parses the rest and a walk keeps visible text: a link's text,
     tags' contents; it drops files/images, categories, interlanguage links, leftover
     templates and tags like `<gallery>`, and decodes HTML entities;
  3. headings become plain lines of their own (listed in the record's "sections"); the
     See also / References / External links ... sections are dropped; no blank lines.
"""

from __future__ import annotations

import bz2
import html
import multiprocessing
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mwparserfromhell as mwp
from mwparserfromhell import nodes

from dtl.data.qa import SKIP_SECTIONS
from dtl.errors import DtlError

# --- 1. the pre-pass ----------------------------------------------------------------------
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")  # __TOC__, __NOTOC__, ...
_REF = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?(?:</ref\s*>|$)", re.S | re.I)
_DROP_TAG_BLOCK = re.compile(
    r"<(gallery|math|timeline|imagemap|score|syntaxhighlight|source|references|chem|graph|mapframe)\b[^>]*?(?:/>|>.*?</\1\s*>)",
    re.S | re.I,
)
_TEMPLATE = re.compile(r"\{\{(?:[^{}]|\{(?!\{)|\}(?!\}))*\}\}")  # innermost: no {{ or }} inside
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)  # innermost table
_DISAMBIG = re.compile(
    r"\{\{\s*(?:disambiguation|disambig|dab|disamb|hndis|geodis|numberdis|letter-numbercombdisambig|"
    r"mathdab|schooldis|shipindex|surname|given name|set index)\s*(?:\||\}\})",
    re.I,
)


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


def prepass(text: str) -> str:
    """Remove comments, refs, block tags, templates, tables and file links (nested) by regex."""
    text = _MAGIC_WORD.sub("", _COMMENT.sub("", text))
    text = _REF.sub("", text)
    text = _DROP_TAG_BLOCK.sub("", text)
    text = _remove_innermost(_TEMPLATE, text, _template_text)
    text = _remove_innermost(_TABLE, text)
    return _drop_file_links(text)


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
    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.Wikilink):
            out.append(_link_text(node))
        elif isinstance(node, nodes.Heading):
            title = _walk(node.title).strip()
            out.append(f"\n\x00{node.level}\x00{title}\n")  # marked; _finish turns it into a line
        elif isinstance(node, nodes.Tag):
            out.append(_tag_text(node))
        elif isinstance(node, nodes.ExternalLink):
            out.append(_walk(node.title) if node.title is not None else "")
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        # Template, Comment, Argument: no visible text
    return "".join(out)


def _tag_text(tag: nodes.Tag) -> str:
    name = str(tag.tag).strip().lower()
    if name in DROP_TAGS:
        return ""
    if name == "br":
        return "\n"
    if tag.wiki_markup in ("*", "#", ";", ":"):  # list markers: the item's text stays
        return "" if tag.contents is None else _walk(tag.contents)
    if tag.wiki_markup == "----":
        return "\n"
    return "" if tag.contents is None or tag.self_closing else _walk(tag.contents)


# --- 3. lines and sections ------------------------------------------------------------------
_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
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
    lines: list[str] = []
    sections: list[str] = []
    skip_level = 0  # > 0 while inside a dropped section
    for raw in text.split("\n"):
        heading = _HEADING_MARK.match(raw.strip())
        if heading:
            level, title = int(heading.group(1)), _tidy(heading.group(2))
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in SKIP_SECTIONS else 0
            if not skip_level and title:
                lines.append(title)
                sections.append(title)
            continue
        if skip_level:
            continue
        line = _tidy(raw)
        if re.search(r"\w", line):
            lines.append(line)
    # A heading left with nothing under it (its body was all templates) is dropped.
    kept = [
        ln
        for i, ln in enumerate(lines)
        if not (ln in sections and (i + 1 == len(lines) or lines[i + 1] in sections))
    ]
    return "\n".join(kept), [s for s in sections if s in kept]


def _tidy(line: str) -> str:
    line = _QUOTES.sub("", _QUOTE_S.sub("'", line.replace("\x00", "")))
    line = _SPACES.sub(" ", line)
    line = _EMPTY_PARENS.sub("", line)
    line = _PAREN_LEAD.sub("(", line)
    line = _PAREN_TAIL.sub(")", line)
    line = _SPACE_PUNCT.sub(r"\1", line)
    return _SPACES.sub(" ", line).strip()


def clean_wikitext(text: str) -> tuple[str, list[str]]:
    """(plain text, section headings) of one page's wikitext."""
    code = mwp.parse(prepass(text), skip_style_tags=False)
    return _finish(html.unescape(_walk(code)))


def is_disambiguation(title: str, text: str) -> bool:
    return title.endswith("(disambiguation)") or _DISAMBIG.search(text) is not None


# --- reading the XML stream -----------------------------------------------------------------
DEFAULT_NAMESPACES = (
    "Talk",
    "User",
    "User talk",
    "Wikipedia",
    "Wikipedia talk",
    "File",
    "File talk",
    "MediaWiki",
    "MediaWiki talk",
    "Template",
    "Template talk",
    "Help",
    "Help talk",
    "Category",
    "Category talk",
    "Portal",
    "Portal talk",
    "Draft",
    "Draft talk",
    "Module",
    "Module talk",
    "Media",
    "Special",
    "Book",
    "TimedText",
    "Gadget",
    "Image",
)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _open(path: Path) -> Any:
    with open(path, "rb") as f:
        magic = f.read(3)
    return bz2.open(path, "rb") if magic == b"BZh" else open(path, "rb")


def iter_pages(path: Path) -> Iterator[dict]:
    """Raw pages `{title, ns, redirect, text}` of a MediaWiki XML export (plain or .bz2)."""
    namespaces = set(DEFAULT_NAMESPACES)
    try:
        with _open(path) as stream:
            context = ET.iterparse(stream, events=("start", "end"))
            root = None
            for event, elem in context:
                if root is None:
                    root = elem
                if event != "end":
                    continue
                tag = _local(elem.tag)
                if tag == "namespace" and elem.text:
                    namespaces.add(elem.text)
                elif tag == "page":
                    yield _page(elem, namespaces)
                    root.clear()  # drop finished pages: memory stays flat
            if root is None or _local(root.tag) != "mediawiki":
                raise DtlError(
                    f"{path}: not a MediaWiki XML export (root <{root.tag if root is not None else ''}>)"
                )
    except ET.ParseError as err:
        line, column = err.position
        raise DtlError(
            f"{path}: invalid XML at line {line}, column {column} ({err.msg if hasattr(err, 'msg') else err}); is the download complete?"
        ) from None
    except EOFError:
        raise DtlError(
            f"{path}: the .bz2 stream ends early (truncated download?); download the file again"
        ) from None
    except OSError as err:
        raise DtlError(
            f"{path}: cannot read the dump ({err}); is it a complete .xml or .xml.bz2 file?"
        ) from None


def _page(elem: ET.Element, namespaces: set[str]) -> dict:
    fields: dict[str, Any] = {"title": "", "ns": None, "redirect": False, "text": ""}
    for child in elem.iter():
        tag = _local(child.tag)
        if tag == "title":
            fields["title"] = (child.text or "").strip()
        elif tag == "ns":
            fields["ns"] = int(child.text or 0)
        elif tag == "redirect":
            fields["redirect"] = True
        elif tag == "text":
            fields["text"] = child.text or ""
    if fields["ns"] is None:  # exports without <ns>: judge by the title's prefix
        prefix = fields["title"].split(":", 1)[0] if ":" in fields["title"] else ""
        fields["ns"] = 1 if prefix in namespaces else 0
    if re.match(r"\s*#redirect\b", fields["text"], re.I):
        fields["redirect"] = True
    return fields


# --- the pool -------------------------------------------------------------------------------


def _clean_chunk(chunk: list[tuple[str, str]]) -> list[tuple[str, str | None, list[str], str]]:
    """Worker: (title, text or None on failure, sections, error)."""
    out = []
    for title, text in chunk:
        try:
            clean, sections = clean_wikitext(text)
            out.append((title, clean, sections, ""))
        except Exception as err:  # one bad page never stops the run
            out.append((title, None, [], f"{type(err).__name__}: {err}"))
    return out


def _chunks(
    pages: Iterator[tuple[str, str]], max_bytes: int = 200_000
) -> Iterator[list[tuple[str, str]]]:
    chunk, size = [], 0
    for page in pages:
        chunk.append(page)
        size += len(page[1])
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _cleaned(chunks: Iterator[list[tuple[str, str]]], processes: int) -> Iterator[list]:
    if processes <= 1:
        for chunk in chunks:
            yield _clean_chunk(chunk)
        return
    # A bounded window of chunks in flight (Pool.imap would read the whole dump ahead).
    # fork where there is one: workers start at once and a user's script needs no __main__
    # guard; they run only the pure-Python cleaner, so the parent's threads do not matter.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(processes) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_clean_chunk, (chunk,)))
            if len(pending) >= 4 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def iter_wikipedia(
    path: str | os.PathLike,
    processes: int | None = None,
    stats: dict | None = None,
    keep_disambiguation: bool = False,
    min_chars: int = 1,
) -> Iterator[dict]:
    """Clean `{title, text, sections}` records of a dump's articles, in dump order.

    `stats` (if given) is filled with pages / articles / redirects / other_namespace /
    disambiguation / failed counts and the failed titles.
    """
    path = Path(path)
    processes = processes or min(os.cpu_count() or 1, 8)
    counts = stats if stats is not None else {}
    for key in (
        "pages",
        "articles",
        "redirects",
        "other_namespace",
        "disambiguation",
        "failed",
        "empty",
    ):
        counts[key] = 0
    counts["failed_titles"] = []

    def wanted() -> Iterator[tuple[str, str]]:
        for page in iter_pages(path):
            counts["pages"] += 1
            if page["redirect"]:
                counts["redirects"] += 1
            elif page["ns"] != 0:
                counts["other_namespace"] += 1
            elif not keep_disambiguation and is_disambiguation(page["title"], page["text"]):
                counts["disambiguation"] += 1
            else:
                yield page["title"], page["text"]

    for results in _cleaned(_chunks(wanted()), processes):
        for title, text, sections, error in results:
            if text is None:
                counts["failed"] += 1
                counts["failed_titles"].append(title)
                print(f"dtl extract: skipped page {title!r}: {error}", file=sys.stderr)
            elif len(text) < min_chars:
                counts["empty"] += 1
            else:
                counts["articles"] += 1
                yield {"title": title, "text": text, "sections": sections}
