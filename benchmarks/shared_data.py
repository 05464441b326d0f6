"""Where the benchmarks find the shared data: `../shared/data` beside the project root (a
user's clone has none; each benchmark says so when it needs a file that is not there).

    from shared_data import WIKITEXT
    text = WIKITEXT.read_text(encoding="utf-8")
"""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"  # WikiText-2's raw test split
ENWIKI = (  # a real, shortened Wikipedia dump part
    SHARED
    / "enwiki-sample"
    / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
GPT2 = SHARED / "gpt2"  # GPT-2's encoder.json and vocab.bpe
