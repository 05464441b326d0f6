"""A Wikipedia dump at scale: `dtl extract` beside wikiextractor on one multistream dump, then
`dtl prepare` of the records beside bare tiktoken.

1. Builds `--mb` MB of `X-multistream.xml.bz2` (Wikimedia's layout: 100 pages a bz2 stream,
   `<siteinfo>` in the first, with its `X-multistream-index.txt.bz2`) from the embedded
   excerpt's real pages (dtl.corpus), repeated under new ids and titles. Kept in `--work` and
   reused when it is already there at that size.
2. `dtl extract DUMP --processes P` and `python -m wikiextractor.WikiExtractor DUMP
   --processes P --no-templates --json` on the same file, one after the other: wall time,
   compressed MB/s, articles/s, peak memory of the whole process tree sampled from /proc
   (RSS, and PSS, which counts the pages forked workers share once), the
   remnant count of each output, and the hours the full English dump would take at that rate
   (ENWIKI_BZ2_GB of bz2, ENWIKI_ARTICLES articles: enwiki-20240601-pages-articles-multistream).
3. `dtl prepare RECORDS --tokenizer gpt2` beside bare tiktoken (`encode_ordinary_batch` of the
   same texts, GPT-2 built by tiktoken's own loader from the package's encoder.json + vocab.bpe).

    pip install wikiextractor            # the peer (benchmarks/requirements.txt); pure Python
    python benchmarks/bench_extract.py --mb 5             # a smoke run
    python benchmarks/bench_extract.py --mb 1000 --processes 2
    python benchmarks/bench_extract.py --mb 60 --scaling --processes 2   # 1 vs 2 processes
    python benchmarks/bench_extract.py --mb 60 --scaling --src ../main/src  # another checkout's

`--scaling`: `dtl extract` alone, at 1 process and at `--processes`, in alternating rounds
(`--rounds`, the order swapped each round, so a busy moment on a shared box hits both), and the
ratio of the fastest of each; then where the N-process run's core-seconds went: the workers'
task CPU (against the 1-process run's: how much slower a core works beside the others), their
CPU outside tasks, the main process's CPU, the start before the first task, each worker's idle
tail after its last task, and the rest (waiting, other processes on the box). First it times a
pure-Python loop alone and N at once: the most this box gives N CPU-bound processes.
"""

from __future__ import annotations

import argparse
import bz2
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENWIKI_BZ2_GB = 22.0  # the English multistream dump, compressed
ENWIKI_ARTICLES = 6.9e6  # its articles (namespace 0, not redirects)
REMNANTS = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "&lt;", "'''")
DTL = [sys.executable, "-c", "import sys; from dtl.cli import main; sys.exit(main())"]


# --- the dump -----------------------------------------------------------------------------------


_PAGES: list = []  # the excerpt's pages, handed to each builder process once


def _set_pages(pages: list) -> None:
    _PAGES[:] = pages


def _copy_streams(copy: int) -> tuple[list[bytes], list[list[str]]]:
    """One copy of the pages under new ids and titles, compressed 100 pages a stream."""
    pages = _PAGES
    streams, index = [], []
    for start in range(0, len(pages), 100):
        xml, lines = [], []
        for page_id, title, page in pages[start : start + 100]:
            new_id, new_title = copy * 10_000_000 + page_id, f"{title} ({copy})"
            page = page.replace(f"<title>{title}</title>", f"<title>{new_title}</title>", 1)
            page = page.replace(f"<id>{page_id}</id>", f"<id>{new_id}</id>", 1)
            xml.append(page)
            lines.append(f"{new_id}:{new_title}")
        streams.append(bz2.compress("".join(xml).encode("utf-8")))
        index.append(lines)
    return streams, index


def build_dump(mb: float, work: Path, processes: int) -> tuple[Path, int]:
    """(the dump, its pages): `mb` MB of multistream bz2 and its index, built in parallel."""
    from dtl.corpus import corpus_files
    from dtl.data.dumps import index_beside, split_export

    header, pages = split_export(bz2.decompress(corpus_files()[0].read_bytes()).decode("utf-8"))
    copy_mb = sum(len(bz2.compress(p.encode())) for _, _, p in pages[:20]) * len(pages) / 20 / 1e6
    copies = max(1, math.ceil(mb / copy_mb))
    path = work / f"enwiki-bench{copies}-pages-articles-multistream.xml.bz2"
    index = index_beside(path)
    count = copies * len(pages)
    if path.exists() and index.exists():
        return path, count
    print(f"building {path.name}: {copies} copies of {len(pages)} real pages ...", flush=True)
    started = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    lines: list[str] = []
    pool = multiprocessing.Pool(processes, initializer=_set_pages, initargs=(pages,))
    with open(tmp, "wb") as out, pool:
        out.write(bz2.compress(header.encode("utf-8")))
        for streams, index_lines in pool.imap(_copy_streams, range(copies)):
            for stream, stream_lines in zip(streams, index_lines, strict=True):
                offset = out.tell()
                out.write(stream)
                lines += [f"{offset}:{line}\n" for line in stream_lines]
        out.write(bz2.compress(b"\n</mediawiki>\n"))
    index.write_bytes(bz2.compress("".join(lines).encode("utf-8")))
    os.replace(tmp, path)
    print(f"built in {time.perf_counter() - started:.0f} s ({processes} processes)", flush=True)
    return path, count


# --- measuring a command ------------------------------------------------------------------------


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of a process and all its descendants, from /proc. RSS counts the
    pages forked workers share once per worker; PSS splits them between their sharers."""
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return rss, pss


def timed(cmd: list[str], **kw) -> dict:
    """Run `cmd`: wall seconds and the peak memory of its process tree (sampled every 0.1 s)."""
    peak = [0, 0]  # RSS, PSS
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)

    def sample() -> None:
        while proc.poll() is None:
            rss, pss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{err.decode()[-2000:]}")
    return {"seconds": seconds, "peak_rss": peak[0], "peak_pss": peak[1], "stdout": out.decode(),
            "stderr": err.decode()}  # fmt: skip


def report(name: str, run: dict, dump_bytes: int, articles: int, remnants: int) -> None:
    s = run["seconds"]
    rate = dump_bytes / s
    hours_bytes = ENWIKI_BZ2_GB * 1e9 / rate / 3600
    hours_articles = ENWIKI_ARTICLES / (articles / s) / 3600
    print(f"{name:15s} {s:8.1f} s  {rate / 1e6:6.2f} MB/s  {articles / s:8.1f} articles/s  "
          f"peak RSS {run['peak_rss'] / 1e6:5.0f} MB (PSS {run['peak_pss'] / 1e6:5.0f})  remnants {remnants:,}  | full enwiki "
          f"({ENWIKI_BZ2_GB:.0f} GB bz2, {ENWIKI_ARTICLES / 1e6:.1f}M articles): "
          f"{hours_bytes:.1f} h by bytes, {hours_articles:.1f} h by articles")  # fmt: skip


def count_remnants(texts) -> int:
    return sum(t.count(m) for t in texts for m in REMNANTS)


# --- the steps ----------------------------------------------------------------------------------


def bench_extract(dump: Path, work: Path, processes: int, env: dict) -> Path:
    size = dump.stat().st_size
    out = work / "dtl.jsonl"
    out.unlink(missing_ok=True)
    cmd = [*DTL, "extract", str(dump), "-o", str(out), "--processes", str(processes), "--force"]
    ours = timed(cmd, env=env)
    texts = [json.loads(line)["text"] for line in out.open(encoding="utf-8")]
    report("dtl extract", ours, size, len(texts), count_remnants(texts))
    peer_dir = work / "wikiextractor"
    shutil.rmtree(peer_dir, ignore_errors=True)
    try:
        import wikiextractor  # noqa: F401
    except ImportError:
        print("wikiextractor: not installed (pip install wikiextractor); skipped")
        return out
    peer = timed([sys.executable, "-m", "wikiextractor.WikiExtractor", str(dump), "--processes",
                  str(processes), "--no-templates", "--json", "-q", "-b", "100M", "-o",
                  str(peer_dir)], env=env)  # fmt: skip
    peer_texts = [json.loads(line)["text"] for f in sorted(peer_dir.rglob("wiki_*"))
                  for line in f.open(encoding="utf-8")]  # fmt: skip
    peer_texts = [t for t in peer_texts if t.strip()]
    report("wikiextractor", peer, size, len(peer_texts), count_remnants(peer_texts))
    print(f"dtl / wikiextractor speed (same file, --processes {processes}): "
          f"{peer['seconds'] / ours['seconds']:.2f}x")  # fmt: skip
    return out


def bench_prepare(records: Path, work: Path, env: dict) -> None:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    ours = timed([*DTL, "prepare", str(records), "-o", str(data), "--tokenizer", "gpt2"], env=env)
    meta = json.loads((data / "meta.json").read_text())
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    gpt2 = ROOT / "src" / "dtl" / "assets" / "gpt2"
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2 / "vocab.bpe"), str(gpt2 / "encoder.json"))
    enc = tiktoken.Encoding("gpt2-bare", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})  # fmt: skip
    start = time.perf_counter()
    bare_tokens, batch = 0, []
    with records.open(encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 256:
                bare_tokens += sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(batch))
                batch = []
    bare_tokens += sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(batch))
    bare = time.perf_counter() - start
    mb = records.stat().st_size / 1e6
    print(f"dtl prepare     {ours['seconds']:8.1f} s  {mb / ours['seconds']:6.2f} MB/s of JSONL  "
          f"{tokens / ours['seconds'] / 1e6:.2f} M tokens/s  peak RSS {ours['peak_rss'] / 1e6:.0f} MB (PSS {ours['peak_pss'] / 1e6:.0f})"
          f"  ({tokens:,} tokens, with the articles' titles)")  # fmt: skip
    print(f"bare tiktoken   {bare:8.1f} s  {mb / bare:6.2f} MB/s of JSONL  "
          f"{bare_tokens / bare / 1e6:.2f} M tokens/s  (read + encode_ordinary_batch, no writing)")  # fmt: skip


# --- scaling: 1 process vs N, and where the N-process run's time went ---------------------------


def probe(dump: str, out: str, processes: int, trace: str) -> None:
    """Run in a child (`--probe`): `extract` with each worker task timed into `trace`
    (a file per process: start, end, CPU seconds, compressed bytes, streams), then one JSON
    line on stdout: when extract started and ended, and the CPU of this process and of its
    workers (which the pool has joined by then)."""
    import resource

    started = time.monotonic()
    import dtl.data.wikipedia as wikipedia
    from dtl.data.extract import extract

    job = wikipedia._unit_job

    def _unit_job(task):  # the pool pickles it by name: it must be the module's attribute
        t, cpu = time.monotonic(), time.process_time()
        batch = job(task)
        units = task[1] if isinstance(task[1], tuple) else (task[1],)
        line = [t, time.monotonic(), time.process_time() - cpu,
                sum(u.end - u.start for u in units), len(units)]  # fmt: skip
        with open(Path(trace) / str(os.getpid()), "a") as f:
            f.write(json.dumps(line) + "\n")
        return batch

    _unit_job.__module__, _unit_job.__qualname__ = wikipedia.__name__, "_unit_job"
    wikipedia._unit_job = _unit_job
    begin = time.monotonic()
    extract(dump, out, "wikipedia", progress=False, processes=processes, force=True)
    end = time.monotonic()
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"started": started, "begin": begin, "end": end,
                      "main_cpu": me.ru_utime + me.ru_stime,
                      "workers_cpu": kids.ru_utime + kids.ru_stime}))  # fmt: skip


def _probe_run(dump: Path, work: Path, processes: int, env: dict) -> dict:
    trace = work / f"trace-{processes}"
    shutil.rmtree(trace, ignore_errors=True)
    trace.mkdir()
    out = work / f"scaling-{processes}.jsonl"
    start = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--probe", str(dump), str(out), str(processes),
                           str(trace)], env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"dtl extract --processes {processes} failed:\n{done.stderr[-2000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    run["wall"], run["start"] = wall, start
    run["workers"] = {
        f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in trace.iterdir()
    }
    run["md5"] = _md5(out)
    out.unlink()
    return run


def _md5(path: Path) -> str:
    import hashlib

    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _spin(iterations: int) -> float:
    """A fixed pure-Python CPU loop (no memory to speak of); returns its CPU seconds."""
    cpu = time.process_time()
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return time.process_time() - cpu


_STREAM: list[bytes] = []  # the dump's largest bz2 stream, for the bz2 ceiling


def _unbz2(times: int) -> float:
    """Decompress _STREAM `times` times; returns the CPU seconds."""
    cpu = time.process_time()
    for _ in range(times):
        bz2.decompress(_STREAM[0])
    return time.process_time() - cpu


def ceiling(processes: int, dump: Path) -> None:
    """The box's own scaling: the same work alone, then `processes` copies at once; a
    pure-Python loop (arithmetic: what SMT siblings or a busy host cost) and bz2 decompression
    (a ~4 MB table per stream, bigger than a core's L2 cache: what shared caches and memory
    cost; it is about a third of dtl extract's CPU)."""
    from dtl.data.dumps import dump_units

    unit = max(dump_units([dump]), key=lambda u: u.end - u.start)
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        _STREAM[:] = [f.read(unit.end - unit.start)]
    ctx = multiprocessing.get_context("fork")
    for name, fn, n in (("a pure-Python loop", _spin, 20_000_000),
                        (f"bz2 decompression ({len(_STREAM[0]) / 1e6:.1f} MB stream)", _unbz2,
                         max(1, int(4e6 / len(_STREAM[0]))) * 2)):  # fmt: skip
        start = time.monotonic()
        alone_cpu = fn(n)
        alone = time.monotonic() - start
        start = time.monotonic()
        with ctx.Pool(processes) as pool:
            cpus = pool.map(fn, [n] * processes, chunksize=1)
        together = time.monotonic() - start
        print(f"ceiling, {name}: {alone:.2f} s alone ({alone_cpu:.2f} s CPU), {processes} at "
              f"once {together:.2f} s ({sum(cpus) / processes:.2f} s CPU each, "
              f"{100 * (sum(cpus) / processes / alone_cpu - 1):+.0f}%): this box runs "
              f"{processes} of them at {processes * alone / together:.2f}x one")  # fmt: skip


def scaling(dump: Path, work: Path, processes: int, rounds: int, env: dict) -> None:
    ceiling(processes, dump)
    runs: dict[int, list] = {1: [], processes: []}
    for r in range(rounds):
        for p in (1, processes) if r % 2 == 0 else (processes, 1):
            run = _probe_run(dump, work, p, env)
            runs[p].append(run)
            print(f"round {r + 1}: dtl extract --processes {p}: {run['wall']:.2f} s", flush=True)
    one = min(runs[1], key=lambda r: r["wall"])
    many = min(runs[processes], key=lambda r: r["wall"])
    same = {r["md5"] for rs in runs.values() for r in rs}
    print(f"dtl extract scaling, --processes 1 -> {processes} (fastest of {rounds} interleaved "
          f"rounds each): {one['wall']:.2f} / {many['wall']:.2f} s = "
          f"**{one['wall'] / many['wall']:.2f}x** (ideal {processes}x); outputs "
          f"{'identical' if len(same) == 1 else 'DIFFER'}")  # fmt: skip
    tasks_one = [t for ts in one["workers"].values() for t in ts]
    tasks = many["workers"]  # pid -> its tasks
    work_one = sum(t[2] for t in tasks_one)
    work_many = sum(t[2] for ts in tasks.values() for t in ts)
    cores = many["wall"] * processes
    outside = many["workers_cpu"] - work_many
    first = min(t[0] for ts in tasks.values() for t in ts)
    lasts = sorted(max(t[1] for t in ts) for ts in tasks.values())
    before = first - many["start"]
    tails = [many["start"] + many["wall"] - last for last in lasts]
    tails += [many["wall"] - before] * (processes - len(lasts))  # a worker that got no task
    other = cores - work_many - outside - many["main_cpu"] - before * processes - sum(tails)
    sizes = sorted(t[3] for ts in tasks.values() for t in ts)
    print(f"where the {processes}-process run's {cores:.1f} core-seconds went "
          f"({many['wall']:.2f} s x {processes}):")  # fmt: skip
    print(f"  the workers' tasks          {work_many:6.2f} core-s (the 1-process run's: "
          f"{work_one:.2f}, so {100 * (work_many / work_one - 1):+.1f}% beside the others)")  # fmt: skip
    print(f"  workers outside their tasks {outside:6.2f} core-s (taking tasks, sending results)")
    print(f"  the main process            {many['main_cpu']:6.2f} core-s (imports, index, "
          f"writing; at 1 process it also runs the tasks: {one['main_cpu']:.2f})")  # fmt: skip
    print(f"  before the first task       {before:6.2f} s x {processes} (start-up, index)")
    print(f"  idle after the last task    {', '.join(f'{t:.2f}' for t in tails)} s (the tail, "
          "per worker)")  # fmt: skip
    print(f"  the rest                    {other:6.2f} core-s (waiting on each other, "
          "other processes on the box)")  # fmt: skip
    print(f"  tasks: {len(sizes)} ({', '.join(str(len(ts)) for ts in tasks.values())} per "
          f"worker), {sizes[0] / 1e6:.2f}-{sizes[-1] / 1e6:.2f} MB of bz2, median "
          f"{sizes[len(sizes) // 2] / 1e6:.2f} MB; at 1 process {len(tasks_one)}")  # fmt: skip


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1000, help="dump size in MB of bz2 (1000)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", default="/tmp/bench-extract", help="where the dump is kept")
    parser.add_argument("--no-prepare", action="store_true", help="skip the prepare step")
    parser.add_argument("--scaling", action="store_true",
                        help="dtl extract alone at 1 and at --processes, interleaved")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="--scaling rounds (3)")
    parser.add_argument("--src", default=str(ROOT / "src"),
                        help="the dtl package's folder to measure (another checkout's src/, "
                        "e.g. main's, to compare with this one's)")  # fmt: skip
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(args.src).resolve())}
    dump, pages = build_dump(args.mb, work, args.processes)
    size = dump.stat().st_size
    print(f"dump {dump.name}: {size / 1e6:.1f} MB bz2, {pages:,} pages; --processes "
          f"{args.processes}, {os.cpu_count()} cores here")  # fmt: skip
    if args.scaling:
        scaling(dump, work, args.processes, args.rounds, env)
        return 0
    records = bench_extract(dump, work, args.processes, env)
    if not args.no_prepare:
        bench_prepare(records, work, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
