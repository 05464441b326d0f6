"""Data-pipeline throughput beside bare peers measured in the same run.

1. Tokenizing stage: what `dtl prepare` does per batch of documents (encode_batch, then
   ids + end-of-text into arrays) beside bare `tiktoken.encode_ordinary_batch` (tiktoken's
   own GPT-2 encoding, built by tiktoken's own loader from the same local files) on the same
   texts. Target: within 1.25x.
2. Wikipedia cleaning of the enwiki excerpt with `iter_wikipedia` (process pool) beside a
   bare `mwparserfromhell.parse(...).strip_code()` on one core, and the remnant count.
   Target: >= 30 articles/s on 2 cores, zero remnants.
3. End-to-end `prepare` on both files: MB of input per second and tokens per second.

    python benchmarks/bench_data.py                    # needs ../shared/data
    python benchmarks/bench_data.py --repeats 5 --processes 2
"""

from __future__ import annotations

import argparse
import bz2
import os
import statistics
import tempfile
import time
from pathlib import Path

from shared_data import ENWIKI, GPT2, WIKITEXT

ROOT = Path(__file__).resolve().parents[1]
REMNANTS = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "&lt;", "'''")


def bare_tiktoken():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2 / "vocab.bpe"), str(GPT2 / "encoder.json"))
    return tiktoken.Encoding("gpt2-bare", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})  # fmt: skip


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_tokenize(name: str, texts: list[str], repeats: int) -> dict:
    from dtl.data.prepare import BATCH, Example, _batched, _encode
    from dtl.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2", gpt2_dir=GPT2)
    peer = bare_tiktoken()
    examples = [Example("", t, str(i), False) for i, t in enumerate(texts)]
    threads = os.cpu_count() or 1

    def ours():
        return sum(
            len(ids) for batch in _batched(examples, BATCH) for ids, _ in _encode(tok, batch, False)
        )

    def bare():
        return sum(len(ids) + 1 for i in range(0, len(texts), BATCH)
                   for ids in peer.encode_ordinary_batch(texts[i : i + BATCH], num_threads=threads))  # fmt: skip

    assert ours() == bare(), "token counts differ"
    # Alternate the two so machine noise hits both alike.
    t_ours, t_bare = [], []
    for _ in range(repeats):
        t_ours.append(median_time(ours, 1))
        t_bare.append(median_time(bare, 1))
    t_ours, t_bare = statistics.median(t_ours), statistics.median(t_bare)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tokens = ours()
    print(f"tokenize {name}: {mb:.2f} MB, {tokens:,} tokens | dtl {mb / t_ours:.2f} MB/s "
          f"{tokens / t_ours / 1e6:.2f} M tok/s | bare tiktoken {mb / t_bare:.2f} MB/s "
          f"| dtl/tiktoken time {t_ours / t_bare:.2f}x (target <= 1.25x)")  # fmt: skip
    return {"ratio": t_ours / t_bare}


def bench_cleaning(processes: int, repeats: int) -> dict:
    import mwparserfromhell

    from dtl.data.wikipedia import is_disambiguation, iter_pages, iter_wikipedia

    pages = [p for p in iter_pages(ENWIKI) if not p["redirect"] and p["ns"] == 0]
    pages = [p for p in pages if not is_disambiguation(p["title"], p["text"])]
    t_pool, t_one = [], []
    records = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        records = list(iter_wikipedia(ENWIKI, processes=processes))
        t_pool.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        list(iter_wikipedia(ENWIKI, processes=1))
        t_one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    bare = [mwparserfromhell.parse(p["text"]).strip_code() for p in pages]
    t_bare = time.perf_counter() - t0
    n = len(records)
    ours_remnants = sum(r["text"].count(m) for r in records for m in REMNANTS)
    bare_remnants = sum(t.count(m) for t in bare for m in REMNANTS)
    pool, one = statistics.median(t_pool), statistics.median(t_one)
    print(f"clean enwiki: {n} articles | dtl {processes} processes {n / pool:.1f} articles/s, "
          f"1 process {n / one:.1f} articles/s, {ours_remnants} remnants | bare mwparserfromhell "
          f"parse+strip_code 1 core {len(pages) / t_bare:.1f} articles/s, {bare_remnants} remnants "
          f"| dtl/bare speed {(n / pool) / (len(pages) / t_bare):.2f}x (target >= 30 articles/s, 0 remnants)")  # fmt: skip
    return {"articles_per_s": n / pool, "remnants": ours_remnants}


def bench_prepare(path: Path, repeats: int) -> None:
    from dtl.data.prepare import prepare

    size = path.stat().st_size
    raw = len(bz2.decompress(path.read_bytes())) if path.suffix == ".bz2" else size
    times, tokens = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            t0 = time.perf_counter()
            s = prepare(
                [path],
                Path(tmp) / f"d{i}",
                tokenizer="gpt2",
                gpt2_dir=GPT2,
                max_length=512,
                progress=False,
            )
            times.append(time.perf_counter() - t0)
            tokens = s["train"]["tokens"] + s["val"]["tokens"]
    t = statistics.median(times)
    print(f"prepare {path.name[:40]}: {size / 1e6:.2f} MB file ({raw / 1e6:.2f} MB of XML/text) "
          f"in {t:.2f}s | {raw / 1e6 / t:.2f} MB/s of input, {tokens / t / 1e3:.0f} k tokens/s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    from dtl.data.sources import iter_records

    print(
        f"{os.cpu_count()} CPU cores, {args.processes} cleaning processes, {args.repeats} repeats (medians)"
    )
    wikitext = [r["text"] for r in iter_records(WIKITEXT, "wikitext")]
    bench_tokenize("wiki.test.raw", wikitext, args.repeats)
    enwiki = [r["text"] for r in iter_records(ENWIKI, "wikipedia", processes=args.processes)]
    bench_tokenize("enwiki excerpt (cleaned)", enwiki, args.repeats)
    bench_cleaning(args.processes, args.repeats)
    bench_prepare(WIKITEXT, args.repeats)
    bench_prepare(ENWIKI, args.repeats)


if __name__ == "__main__":
    main()
