"""The corpus inside the package: what `dtl quickstart` trains on, with no download.

>>> from dtl.corpus import corpus_files
>>> [p.name for p in corpus_files()]
['wikipedia-excerpt.xml.bz2', 'squad-excerpt.json']

Two public data sets in their own formats, so the quickstart runs the real pipeline on them
(NOTICE.md in this folder names their sources and licences; tools/build_corpus.py rebuilt them):
  wikipedia-excerpt.xml.bz2  106 article pages of a real English Wikipedia pages-articles XML
                             dump (full wikitext markup): CC BY-SA 3.0 / GFDL
  squad-excerpt.json         293 answerable SQuAD v2.0 dev questions on 2 articles: CC BY-SA 4.0
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

WIKIPEDIA = "wikipedia-excerpt.xml.bz2"
SQUAD = "squad-excerpt.json"


def corpus_files() -> list[Path]:
    """Paths of the embedded corpus files (Wikipedia dump excerpt, SQuAD questions)."""
    folder = Path(str(resources.files("dtl.corpus")))
    return [folder / WIKIPEDIA, folder / SQUAD]
