"""The data pipeline, one module per stage of the spec's "Training Data Flow".

sources.py                  raw files -> clean records (`dtl extract`, with extract.py)
dumps.py                    a dump's files, multistream index and units (byte ranges)
wikipedia.py                a Wikipedia XML dump -> article pages, cleaned on all cores
wikimarkup.py               one page's wikitext -> plain text and section headings
qa.py                       the Q&A template; articles -> Q&A pairs
prepare.py / shards.py      records -> tokenized train/val shards + meta.json (`dtl prepare`)
split.py                    the train/val split: by document, or within too few documents
loader.py                   shards -> batches (`TokenDataset`, `BatchLoader`)

>>> from dtl.data import BatchLoader, prepare                          # doctest: +SKIP
>>> prepare(["wiki.test.raw"], "data/wt2", max_length=128)             # doctest: +SKIP
>>> batch = next(iter(BatchLoader("data/wt2", "train", batch_size=4)))  # doctest: +SKIP
"""

from dtl.lazy import lazy_exports

# Imported on first use: `dtl extract` (dumps, wikipedia, wikimarkup) never loads torch.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BatchLoader": "dtl.data.loader",
        "TokenDataset": "dtl.data.loader",
        "read_meta": "dtl.data.loader",
        "prepare": "dtl.data.prepare",
        "QA_STOP": "dtl.data.qa",
        "QA_TEMPLATE": "dtl.data.qa",
        "format_qa": "dtl.data.qa",
        "qa_prompt": "dtl.data.qa",
        "iter_records": "dtl.data.sources",
    },
)

__all__ = [
    "QA_STOP",
    "QA_TEMPLATE",
    "BatchLoader",
    "TokenDataset",
    "format_qa",
    "iter_records",
    "prepare",
    "qa_prompt",
    "read_meta",
]
