"""Whole dumps: multistream files read stream by stream through their index, parts and folders
of parts, the same bytes for any --processes, and a killed `dtl extract` continued."""

from __future__ import annotations

import bz2
import contextlib
import heapq
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from data_helpers import run_cli

from dtl.corpus import corpus_files
from dtl.data import dumps, wikipedia
from dtl.data import extract as extract_module
from dtl.data.dumps import Unit, dump_units, index_beside, split_export, write_multistream
from dtl.data.extract import extract
from dtl.data.wikipedia import WorkerLost, iter_wikipedia

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export():
    """(header, pages) of the embedded excerpt: a real dump's siteinfo and 106 real pages."""
    wiki = corpus_files()[0]
    return split_export(bz2.decompress(wiki.read_bytes()).decode("utf-8"))


@pytest.fixture(scope="module")
def reference():
    """The excerpt's records and JSONL bytes read as one document, the way main always read
    it (one bz2 stream, one process); checked against the raw XML in test_data_wikipedia."""
    wiki = corpus_files()[0]
    records = list(iter_wikipedia(wiki, processes=1))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return records, text.encode("utf-8")


@pytest.fixture(scope="module")
def multistream(export, tmp_path_factory):
    """The excerpt laid out as Wikimedia's multistream dump: 10 pages a stream, and its index."""
    path = tmp_path_factory.mktemp("ms") / "enwiki-test-pages-articles-multistream.xml.bz2"
    header, pages = export
    write_multistream(header, pages, path, per_stream=10)
    return path


def _cli(capsys, *argv):
    return run_cli([str(a) for a in argv], capsys)


def test_the_multistream_layout_as_wikimedia_publishes_it(multistream, export):
    index = multistream.with_name("enwiki-test-pages-articles-multistream-index.txt.bz2")
    assert index_beside(multistream) == index
    lines = bz2.decompress(index.read_bytes()).decode().splitlines()
    assert len(lines) == len(export[1]) == 106
    data = multistream.read_bytes()
    offsets = sorted({int(line.split(":", 1)[0]) for line in lines})
    assert len(offsets) == 11  # 106 pages, 10 a stream
    # Each offset starts a bz2 stream that decompresses alone to whole <page>s: the format.
    ends = offsets[1:] + [len(data)]
    first = bz2.decompress(data[offsets[0] : ends[0]]).decode()
    assert first.lstrip().startswith("<page>") and first.count("<page>") == 10
    assert "<siteinfo>" in bz2.decompress(data[: offsets[0]]).decode()
    units = dump_units([multistream])
    assert [(u.start, u.end) for u in units] == list(
        zip([0] + offsets, offsets + [len(data)], strict=True)
    )


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_a_multistream_dump_gives_the_one_document_records(multistream, reference, processes):
    stats: dict = {}
    records = list(iter_wikipedia(multistream, processes=processes, stats=stats))
    assert records == reference[0]
    assert (stats["pages"], stats["articles"], stats["disambiguation"]) == (106, 98, 8)


def test_extract_writes_the_same_bytes_for_any_processes(multistream, reference, tmp_path, capsys):
    for processes in (1, 2, 3):
        out = tmp_path / f"p{processes}.jsonl"
        code, stdout, err = _cli(
            capsys, "extract", multistream, "-o", out, "--processes", processes
        )
        assert code == 0, err
        assert stdout.startswith("98 records (wikipedia)")
        assert out.read_bytes() == reference[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1.jsonl", "p2.jsonl", "p3.jsonl"]


def _write_parts(export, folder: Path, sizes: list[int]) -> list[Path]:
    """The excerpt cut into plain single-stream parts named as Wikimedia names them."""
    header, pages = export
    folder.mkdir()
    parts, start = [], 0
    for number, size in enumerate(sizes, 1):
        chunk = pages[start : start + size]
        name = f"enwiki-test-pages-articles{number}.xml-p{chunk[0][0]}p{chunk[-1][0]}.bz2"
        xml = header + "".join(p for _, _, p in chunk) + "</mediawiki>\n"
        (folder / name).write_bytes(bz2.compress(xml.encode("utf-8")))
        parts.append(folder / name)
        start += size
    assert start == len(pages)
    return parts


def test_parts_and_a_folder_of_them(export, reference, tmp_path, capsys):
    # 11 parts: part 10 sorts after part 9 (not after part 1), as the dump's page order needs.
    parts = _write_parts(export, tmp_path / "parts", [10] * 10 + [6])
    (tmp_path / "parts" / "notes.txt").write_text("not a dump")
    for processes in (1, 2, 12):  # 12 > 11 parts: one reader in front of the cleaners
        out = tmp_path / f"folder{processes}.jsonl"
        code, _, err = _cli(
            capsys, "extract", tmp_path / "parts", "-o", out, "--processes", processes
        )
        assert code == 0, err
        assert out.read_bytes() == reference[1]
    out = tmp_path / "list.jsonl"
    code, _, err = _cli(capsys, "extract", *parts, "-o", out, "--processes", 2)
    assert code == 0 and out.read_bytes() == reference[1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no spool left


def _stop_after(monkeypatch, dump, out, batches: int, processes: int):
    """Run `extract` committing after every batch and stop it (Ctrl-C) as it is about to write
    batch `batches` + 1; returns the real `_write_payload` (patched out until restored)."""
    monkeypatch.setattr(extract_module, "COMMIT_SECONDS", 0.0)  # commit after every batch
    real, calls = extract_module._write_payload, []

    def stop(payload, f):
        calls.append(1)
        if len(calls) == batches + 1:
            raise KeyboardInterrupt
        return real(payload, f)

    monkeypatch.setattr(extract_module, "_write_payload", stop)
    with pytest.raises(KeyboardInterrupt):
        extract(dump, out, processes=processes, progress=False)
    return real


def test_a_stopped_run_continues_to_the_same_bytes(multistream, reference, tmp_path, monkeypatch):
    """A run stopped after some commits leaves a partial file and a progress record; the rerun
    continues from there (not from the start) and ends with the unbroken run's bytes."""
    out = tmp_path / "wiki.jsonl"
    real = _stop_after(monkeypatch, multistream, out, batches=8, processes=2)
    record = json.loads((tmp_path / ".wiki.jsonl.progress.json").read_text())
    assert record["position"] == [8, 0]  # units 0..7 written (unit 0: the siteinfo stream)
    assert not out.exists()
    monkeypatch.setattr(extract_module, "_write_payload", real)
    written = []
    monkeypatch.setattr(
        extract_module, "_write_payload", lambda p, f: written.append(1) or real(p, f)
    )
    summary = extract(multistream, out, processes=3, progress=False)
    assert len(written) == len(dump_units([multistream])) - 8  # only what was left
    assert out.read_bytes() == reference[1] and summary["records"] == 98
    assert summary["skipped"]["disambiguation"] == 8  # the counts carried over the stop
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wiki.jsonl"]


_UNIT_JOB = wikipedia._unit_job


def _unit_job_dying_at_unit_6(task):
    """A worker's task that kills its process at unit 6 (as the OOM killer would)."""
    if task[0] == 6:
        os._exit(1)
    return _UNIT_JOB(task)


def test_a_worker_killed_stops_the_run_and_the_rerun_continues(
    multistream, reference, tmp_path, monkeypatch
):
    """A dead worker is one clear error, not a run that waits forever for its task; what was
    committed stays, and the rerun finishes with the unbroken run's bytes."""
    out = tmp_path / "wiki.jsonl"
    monkeypatch.setattr(extract_module, "COMMIT_SECONDS", 0.0)
    monkeypatch.setattr(wikipedia, "_unit_job", _unit_job_dying_at_unit_6)
    with pytest.raises(WorkerLost, match="a worker process died"):
        extract(multistream, out, processes=2, progress=False)
    record = json.loads((tmp_path / ".wiki.jsonl.progress.json").read_text())
    assert 1 <= record["position"][0] <= 6
    monkeypatch.setattr(wikipedia, "_unit_job", _UNIT_JOB)
    extract(multistream, out, processes=2, progress=False)
    assert out.read_bytes() == reference[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wiki.jsonl"]


def _dtl(*argv: str) -> list[str]:
    code = "import sys; from dtl.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, *argv]


def test_sigkill_at_random_points_then_finish(export, reference, tmp_path):
    """`dtl extract` killed with SIGKILL at random moments, rerun each time with the same
    arguments, finishes with exactly the unbroken run's bytes, having continued at least once."""
    header, pages = export
    dump = tmp_path / "big-multistream.xml.bz2"
    # The excerpt twice under new ids and titles: 212 pages, 22 streams.
    copies = [
        (
            i * 100_000 + pid,
            f"{title} {i}",
            page.replace(f"<title>{title}</title>", f"<title>{title} {i}</title>"),
        )
        for i in range(2)
        for pid, title, page in pages
    ]
    write_multistream(header, copies, dump, per_stream=10)
    # A commit after every batch, so the kills below land between commits however fast the
    # machine is (at the default 1 s, a quiet machine finished before the first kill).
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DTL_EXTRACT_COMMIT_SECONDS": "0"}
    out = tmp_path / "wiki.jsonl"
    record = tmp_path / ".wiki.jsonl.progress.json"
    subprocess.run(_dtl("extract", str(dump), "-o", str(tmp_path / "ref.jsonl"), "--processes", "2"),
                   env=env, check=True, capture_output=True)  # fmt: skip
    rng = random.Random(22)
    continued = 0
    # Each run killed at a random point: after a random number (1-3) of its commits, then a
    # random few milliseconds, so that each rerun has something to continue.
    for _attempt in range(3):
        if out.exists():  # a run finished before its kill
            break
        run = subprocess.Popen(_dtl("extract", str(dump), "-o", str(out), "--processes", "2"),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)  # fmt: skip
        last = record.read_bytes() if record.exists() else b""
        commits, seen = rng.randint(1, 3), 0
        deadline = time.monotonic() + 120
        while run.poll() is None and seen < commits and time.monotonic() < deadline:
            now = record.read_bytes() if record.exists() else b""
            if now != last:
                seen, last = seen + 1, now
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        run.send_signal(signal.SIGKILL)  # the main process only, as the OOM killer would
        run.wait()
        time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):  # workers die with it; make sure
            os.killpg(run.pid, signal.SIGKILL)
        continued += b"continuing the stopped run" in run.stderr.read()
        run.stdout.close()
        run.stderr.close()
    done = subprocess.run(_dtl("extract", str(dump), "-o", str(out), "--processes", "3"),
                          env=env, capture_output=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    continued += b"continuing the stopped run" in done.stderr
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert continued >= 1
    assert len(out.read_bytes().splitlines()) == 2 * len(reference[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "big-multistream-index.txt.bz2",
        "big-multistream.xml.bz2",
        "ref.jsonl",
        "wiki.jsonl",
    ]


def test_other_arguments_over_a_stopped_run_are_refused(multistream, tmp_path, monkeypatch, capsys):
    out = tmp_path / "wiki.jsonl"
    real = _stop_after(monkeypatch, multistream, out, batches=4, processes=1)
    monkeypatch.setattr(extract_module, "_write_payload", real)
    code, _, err = _cli(capsys, "extract", multistream, "-o", out, "--keep-disambiguation")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a stopped extract of other inputs or options is here" in err and "--force" in err
    # The refusal kept the stopped run: with its own arguments it still continues.
    assert (tmp_path / ".wiki.jsonl.partial").exists()
    assert json.loads((tmp_path / ".wiki.jsonl.progress.json").read_text())["position"] == [4, 0]
    code, stdout, _ = _cli(
        capsys, "extract", multistream, "-o", out, "--keep-disambiguation", "--force"
    )
    assert code == 0 and stdout.startswith("106 records")  # the 8 disambiguation pages kept


def _error(capsys, *argv) -> str:
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err  # one clear line
    return err.strip()


def test_bad_dumps_give_one_line_and_leave_nothing(multistream, export, tmp_path, capsys):
    data = multistream.read_bytes()
    index = index_beside(multistream).read_bytes()
    out = tmp_path / "out.jsonl"
    # A multistream dump without its index.
    alone = tmp_path / "alone" / "x-multistream.xml.bz2"
    alone.parent.mkdir()
    alone.write_bytes(data)
    err = _error(capsys, "extract", alone, "-o", out)
    assert "its index x-multistream-index.txt.bz2 is not beside it" in err and "--index" in err
    # ... which --index none reads as one document, and --index names.
    code, stdout, _ = _cli(capsys, "extract", alone, "-o", out, "--index", "none")
    assert code == 0 and stdout.startswith("98 records")
    err = _error(capsys, "extract", alone, "-o", out, "--index", tmp_path / "no-index.txt.bz2")
    assert "--index" in err and "no such file" in err
    # An index that is not this dump's: another layout (20 pages a stream).
    other = tmp_path / "other" / "y-multistream.xml.bz2"
    other.parent.mkdir()
    write_multistream(export[0], export[1], other, per_stream=20)
    err = _error(capsys, "extract", alone, "-o", out, "--index", index_beside(other))
    assert "does not match x-multistream.xml.bz2" in err
    # Offsets shifted by one byte inside the file.
    shifted = re.sub(
        rb"(?m)^(\d+):", lambda m: b"%d:" % (int(m.group(1)) + 1), bz2.decompress(index)
    )
    (tmp_path / "shifted.txt.bz2").write_bytes(bz2.compress(shifted))
    err = _error(capsys, "extract", alone, "-o", out, "--index", tmp_path / "shifted.txt.bz2")
    assert "no bz2 stream starts at byte" in err
    # A truncated download: cut inside the last stream, and cut before the last streams.
    cut = tmp_path / "cut" / "z-multistream.xml.bz2"
    cut.parent.mkdir()
    (cut.parent / "z-multistream-index.txt.bz2").write_bytes(index)
    cut.write_bytes(data[:-200])
    err = _error(capsys, "extract", cut, "-o", out)
    assert "z-multistream.xml.bz2: the .bz2 stream ends early (truncated download?)" in err
    cut.write_bytes(data[: len(data) // 2])
    err = _error(capsys, "extract", cut, "-o", out)
    assert "truncated download?" in err
    err = _error(capsys, "extract", tmp_path / "empty-folder", "-o", out)
    assert "no such file" in err
    (tmp_path / "empty-folder").mkdir()
    err = _error(capsys, "extract", tmp_path / "empty-folder", "-o", out)
    assert "no dump files" in err
    err = _error(capsys, "extract", alone, cut, "--kind", "text", "-o", out)
    assert "only a Wikipedia dump can be several files or a folder" in err
    err = _error(capsys, "extract", alone, cut, "-o", out, "--index", index_beside(other))
    assert "--index names the index of one dump file, but 2 were given" in err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["alone", "cut", "empty-folder", "other", "out.jsonl", "shifted.txt.bz2"]
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [
        "z-multistream-index.txt.bz2",
        "z-multistream.xml.bz2",
    ]


def test_progress_lines_in_a_log(multistream, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(extract_module, "LOG_SECONDS", 0.0)
    extract(multistream, tmp_path / "w.jsonl", processes=1, progress="log")
    lines = capsys.readouterr().err.strip().splitlines()
    line = re.compile(
        r"^extract: [\d.]+ [kMG]?B of 1\.\d MB \(\d+\.\d%\), [\d.]+ [kMG]?B/s, [\d,]+ articles "
        r"\([\d,]+/s\), ETA \d+:\d\d:\d\d$"
    )
    assert len(lines) >= 10 and all(line.match(x) for x in lines), lines
    assert lines[-1].startswith("extract: 1.") and "(100.0%)" in lines[-1]


def test_prepare_reads_a_multistream_dump_without_its_index_as_one_stream(
    multistream, reference, tmp_path
):
    """`dtl prepare` (iter_wikipedia) has no --index: the index is used when beside the dump,
    and a dump without one is read from its start like any other."""
    alone = tmp_path / "x-multistream.xml.bz2"
    alone.write_bytes(multistream.read_bytes())
    assert list(iter_wikipedia(alone, processes=2)) == reference[0]


def test_a_second_extract_to_the_same_output_stops_at_once(multistream, tmp_path, capsys):
    out = tmp_path / "wiki.jsonl"
    partial = tmp_path / ".wiki.jsonl.partial"
    holder = subprocess.Popen(  # another process writing -o: it holds the partial file's lock
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'ab+'); "
         "fcntl.lockf(f.fileno(), fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
         str(partial)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"locked\n"
        err = _error(capsys, "extract", multistream, "-o", out)
        assert "another dtl extract is writing it" in err
        assert partial.exists()  # the other run's file is left alone
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


# --- sharing the streams out: tasks sized by bytes, the last ones largest first ---------------


def _streams(sizes: list[int], whole: tuple[int, ...] = ()) -> list[Unit]:
    """Units laid end to end with these compressed sizes (those numbered in `whole`: files)."""
    units, at = [], 0
    for number, size in enumerate(sizes):
        units.append(
            Unit(f"d{number}" if number in whole else "d", at, at + size, 0, number in whole)
        )
        at += size
    return units


def _greedy_makespan(costs: list[float], processes: int) -> float:
    """When the last of `processes` workers is done, each taking the next task as it comes
    free (as the pool hands them out)."""
    free = [0.0] * processes
    for cost in costs:
        heapq.heapreplace(free, free[0] + cost)
    return max(free)


@pytest.mark.parametrize("processes", [2, 8, 64])
def test_streams_are_shared_out_in_tasks_sized_by_bytes(processes):
    """A real dump's streams are ~0.1 MB: one task each would pay a task's fixed cost
    (hand-out, a result through a pipe) for every ~40 ms of work. Grouped by bytes, the tasks
    stay few, each at most 1 MB (unless one stream is bigger), cover the dump in order, leave
    many per worker, and shrink toward the end so the workers finish together."""
    rng = random.Random(processes)
    sizes = [rng.randint(50_000, 150_000) for _ in range(24_000)]  # ~2.4 GB of bz2
    sizes[5] = 3_000_000  # one stream bigger than a task: alone
    units = _streams(sizes)
    ranges = wikipedia.task_ranges(units, 0, processes)
    assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]] and ranges[-1][1] == len(
        units
    )
    task_bytes = [sum(sizes[a:b]) for a, b in ranges]
    assert all(t <= 1_000_000 or b - a == 1 for t, (a, b) in zip(task_bytes, ranges, strict=True))
    assert (5, 6) in ranges
    assert 8 * processes <= len(ranges) <= len(sizes) / 5  # many per worker, ~8 streams a task
    assert ranges[-1][1] - ranges[-1][0] == 1  # the last task: one stream
    # Each worker taking the next task as it comes free (cost = bytes): done within 2% of a
    # perfect share.
    assert _greedy_makespan(task_bytes, processes) <= 1.02 * sum(sizes) / processes


def test_a_task_starts_where_a_stopped_run_did_and_whole_files_go_alone():
    sizes = [600, 100_000, 100_000, 100_000, 5_000_000, 100_000, 100_000]
    ranges = wikipedia.task_ranges(_streams(sizes, whole=(4,)), 2, 2)
    assert ranges[0][0] == 2 and (4, 5) in ranges and ranges[-1][1] == 7
    assert all(not (a < 4 < b) for a, b in ranges)  # no task runs across the whole file


def test_small_streams_give_the_same_bytes_and_resume_across_groupings(
    export, reference, tmp_path, monkeypatch
):
    """One page a stream: several streams to a task. A run stopped after 3 tasks records a
    stream boundary past stream 3; a rerun with another --processes (so other tasks) continues
    there and ends with the one-document bytes."""
    header, pages = export
    dump = tmp_path / "small-multistream.xml.bz2"
    write_multistream(header, pages, dump, per_stream=1)  # 106 streams of ~16 kB
    units = dump_units([dump])
    batches = list(wikipedia.wikipedia_batches(units, wikipedia.Settings(as_json=True), 2))
    assert b"".join(b.payload for b in batches) == reference[1]
    assert len(batches) < len(units) / 2  # grouped (one task a stream before)
    out = tmp_path / "wiki.jsonl"
    real = _stop_after(monkeypatch, dump, out, batches=3, processes=2)
    position = json.loads((tmp_path / ".wiki.jsonl.progress.json").read_text())["position"]
    assert 3 < position[0] < len(units) and position[1] == 0
    monkeypatch.setattr(extract_module, "_write_payload", real)
    extract(dump, out, processes=3, progress=False)
    assert out.read_bytes() == reference[1]


class _InlineExecutor:
    """A ProcessPoolExecutor stand-in that runs each task as it is submitted, in this
    process, and notes the order in which tasks were handed out."""

    handed_out: list = []

    def __init__(self, *args, **kwargs) -> None:
        pass

    def submit(self, fn, task):
        self.handed_out.append(task[0])
        future = Future()
        future.set_result(fn(task))
        return future

    def shutdown(self, wait=True, cancel_futures=False) -> None:
        pass


def test_the_last_tasks_go_out_largest_first_and_come_back_in_order(
    multistream, reference, monkeypatch
):
    """At the end a worker that is handed a big stream last keeps the others waiting: the
    last window of tasks goes out largest first (the small ones fill in), and the records
    still come back in dump order."""
    monkeypatch.setattr(wikipedia, "ProcessPoolExecutor", _InlineExecutor)
    _InlineExecutor.handed_out = []
    units = dump_units([multistream])  # 12 streams (siteinfo, 10 pages each, 6 pages)
    settings = wikipedia.Settings(as_json=True)
    batches = list(wikipedia.wikipedia_batches(units, settings, processes=2))
    assert b"".join(b.payload for b in batches) == reference[1]
    assert sorted(_InlineExecutor.handed_out) == list(range(len(units)))  # one stream a task
    # The window is 4 x 2 tasks: the first 4 go out in order, the last 8 by size, largest
    # first (sizes from the index's offsets, as laid out in the file).
    size = {n: u.end - u.start for n, u in enumerate(units)}
    last = sorted(range(4, len(units)), key=lambda n: (-size[n], n))
    assert _InlineExecutor.handed_out == [0, 1, 2, 3, *last]


def _many_streams(folder: Path, count: int) -> Path:
    """A multistream dump of `count` one-page streams (tiny synthetic pages)."""
    header = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/"><siteinfo></siteinfo>'
    pages = [
        (n, f"Page {n}", f"<page><title>Page {n}</title><ns>0</ns><id>{n}</id><revision>"
         f"<text>Page {n} is a page.</text></revision></page>")
        for n in range(1, count + 1)
    ]  # fmt: skip
    dump = folder / "many-multistream.xml.bz2"
    write_multistream(header, pages, dump, per_stream=1)
    return dump


def test_a_big_index_is_spot_checked_before_the_workers_start(tmp_path, monkeypatch):
    """The English index lists ~240k streams: reading 3 bytes at each before any work is a
    seek per stream in front of the workers (minutes on a disk). A few spread checks refuse a
    wrong index at once; the workers check every stream they read (next test)."""
    dump = _many_streams(tmp_path, 2000)
    seeks: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def seek(self, offset, *args):
            seeks.append(offset)
            return self.f.seek(offset, *args)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Counting(f) if Path(path) == dump and "b" in mode else f

    monkeypatch.setattr(dumps, "open", counting_open, raising=False)
    units = dump_units([dump])
    assert len(units) == 2001  # siteinfo, 2000 one-page streams (the last with </mediawiki>)
    assert 10 <= len(seeks) <= 70


def test_a_wrong_offset_deep_in_the_index_stops_the_run_in_one_line(tmp_path, capsys):
    """An offset that the spot checks skip is found by the worker that reads it: one line,
    nothing left behind."""
    dump = _many_streams(tmp_path, 300)
    index = index_beside(dump)
    lines = bz2.decompress(index.read_bytes()).decode().splitlines()
    offset, rest = lines[100].split(":", 1)  # stream 101: not one of the ~64 spot checks
    lines[100] = f"{int(offset) + 1}:{rest}"
    index.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    for processes in (1, 2):
        err = _error(
            capsys, "extract", dump, "-o", tmp_path / "out.jsonl", "--processes", processes
        )
        assert f"no bz2 stream starts at byte {int(offset) + 1}" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "many-multistream-index.txt.bz2",
            "many-multistream.xml.bz2",
        ]
