"""Rebuild the quickstart corpus (src/dtl/corpus/) from the shared public data.

    python tools/build_corpus.py [--shared ../shared/data]

The corpus is an excerpt of two public data sets, kept in their own formats so that
`dtl quickstart` runs the real pipeline on them (Wikipedia markup cleaning, SQuAD parsing):
  wikipedia-excerpt.xml.bz2  the article pages (namespace 0, no redirects) of a real English
                             Wikipedia pages-articles dump excerpt: text CC BY-SA / GFDL
  squad-excerpt.json         the answerable questions of a SQuAD v2.0 dev slice: CC BY-SA 4.0
Run it only to change the corpus; the files it writes are committed.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "dtl" / "corpus"
DUMP = "enwiki-sample/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SQUAD = "squad/squad-v2-dev-small.json"
PAGE = re.compile(r"  <page>\n.*?</page>\n", re.S)


def wikipedia_excerpt(dump: Path) -> tuple[bytes, int]:
    """The dump's header, its article pages, and its footer, bz2-compressed."""
    xml = bz2.decompress(dump.read_bytes()).decode("utf-8")
    first = xml.index("  <page>")
    pages = [
        p.group(0)
        for p in PAGE.finditer(xml)
        if "<ns>0</ns>" in p.group(0) and "<redirect" not in p.group(0)
    ]
    body = xml[:first] + "".join(pages) + "</mediawiki>\n"
    return bz2.compress(body.encode("utf-8"), 9), len(pages)


def squad_excerpt(path: Path) -> tuple[bytes, int]:
    """The answerable questions of a SQuAD JSON file, in SQuAD's own format."""
    data = json.loads(path.read_text(encoding="utf-8"))
    articles, count = [], 0
    for article in data["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            qas = [
                {"id": qa["id"], "question": qa["question"], "answers": qa["answers"]}
                for qa in para["qas"]
                if qa["answers"] and not qa.get("is_impossible")
            ]
            if qas:
                paragraphs.append({"context": para["context"], "qas": qas})
                count += len(qas)
        articles.append({"title": article["title"], "paragraphs": paragraphs})
    text = json.dumps({"version": "v2.0", "data": articles}, ensure_ascii=False, indent=None)
    return (text + "\n").encode("utf-8"), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    shared = Path(parser.parse_args().shared)
    OUT.mkdir(parents=True, exist_ok=True)
    wiki, n_pages = wikipedia_excerpt(shared / DUMP)
    squad, n_questions = squad_excerpt(shared / SQUAD)
    (OUT / "wikipedia-excerpt.xml.bz2").write_bytes(wiki)
    (OUT / "squad-excerpt.json").write_bytes(squad)
    for name, blob, what in (
        ("wikipedia-excerpt.xml.bz2", wiki, f"{n_pages} pages"),
        ("squad-excerpt.json", squad, f"{n_questions} questions"),
    ):
        print(f"{name}: {what}, {len(blob):,} bytes, sha256 {hashlib.sha256(blob).hexdigest()}")


if __name__ == "__main__":
    main()
