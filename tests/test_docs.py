"""The docs run (issue 20, item 6): what README.md and docs/*.md show a user must work as shown.

- Every fenced ```python block is executed, in a folder of its own. A block that needs files
  says so in an HTML comment just before it, and the test provides them:

      <!-- doc-test: setup=tiny_run -->          runs/tiny, runs/qa (a tiny trained run, made
                                                 once per session) and data/wt2 (its data)
      <!-- doc-test: setup=hf_export -->         tiny-hf/ (`dtl export runs/tiny --format hf`)
      <!-- doc-test: setup=onnx_export -->       tiny-onnx/ (`... --format onnx`)
      <!-- doc-test: setup=legacy_pt -->         best_model.pt (the original scripts' format)
      <!-- doc-test: setup=server -->            `dtl serve --model runs/qa --api-key s3cret`
                                                 on a free port; the block's 127.0.0.1:8000
                                                 is pointed at it
      <!-- doc-test: skip=REASON -->             not run here (a GPU, the network, torchrun):
                                                 the reason is required, and the excused
                                                 blocks are counted (EXCUSED) so none drops
                                                 out of the test silently

  Several setups combine: `setup=tiny_run,hf_export`.
- Every `dtl.<module>[.<name>]` the docs name, in prose or any block, imports and resolves, and
  every `src/dtl/...`, `dtl/...`, `benchmarks/...`, `tools/...`, `tests/...` path exists: a
  renamed module fails here, not for a user.
- Every `dtl ...` command line in a bash or console block parses with `dtl`'s own parser (the
  verb and each flag exist).
- Every docstring example (`>>>`) of the package passes under doctest, run in a folder holding
  the same tiny run as `runs/tiny`, `my-export/` (its hf export), `tiny-onnx/` and `data/wiki`
  (rows of 512 tokens), with `model` and `tokenizer` (the tiny run's) in the examples'
  namespace. An example that cannot run there (hours of training, a server that never
  returns) is marked `# doctest: +SKIP`; a failing one is fixed, never skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import doctest
import importlib
import io
import re
import shlex
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from testkit import LiveServer

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py", "python3"}
SETUPS = ("tiny_run", "hf_export", "onnx_export", "legacy_pt", "server")
# Python blocks excused by `<!-- doc-test: skip=REASON -->`. Change it only with the markers.
EXCUSED = 0

MARKER = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
CORPUS = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to "
    "Normandy, a region in France. They were descended from Norse raiders and pirates from "
    "Denmark, Iceland and Norway. Aristotle was a Greek philosopher and polymath during the "
    "Classical period in Ancient Greece. Anarchism is a political philosophy and movement "
    "that is sceptical of authority and rejects all involuntary, coercive forms of hierarchy.\n\n"
)


@dataclass(frozen=True)
class Block:
    """One fenced block of a doc file: where it starts, its language, its text, its marker."""

    path: Path
    line: int
    lang: str
    code: str
    setup: tuple[str, ...] = ()
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def parse_marker(text: str, where: str) -> tuple[tuple[str, ...], str | None]:
    """(setups, skip reason) of a `doc-test:` marker's text; a ValueError names a bad one."""
    key, _, value = text.partition("=")
    value = value.strip()
    if key.strip() == "skip":
        if not value:
            raise ValueError(f"{where}: `doc-test: skip=` needs a reason")
        return (), value
    if key.strip() == "setup":
        names = tuple(n.strip() for n in value.split(",") if n.strip())
        unknown = [n for n in names if n not in SETUPS]
        if not names or unknown:
            raise ValueError(f"{where}: unknown doc-test setup {unknown or value!r}; "
                             f"known: {', '.join(SETUPS)}")  # fmt: skip
        return names, None
    raise ValueError(f"{where}: a doc-test marker is `setup=NAME[,NAME]` or `skip=REASON`")


def doc_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the `doc-test:` marker that precedes it
    (only blank lines may stand between them)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, pending, i = [], None, 0
    while i < len(lines):
        marker = MARKER.fullmatch(lines[i].strip())
        fence = FENCE.match(lines[i])
        if marker:
            if pending is not None:
                raise ValueError(f"{path.name}:{pending[0]}: a doc-test marker with no block")
            pending = (i + 1, marker.group(1))
        elif fence:
            start, close = i, fence.group(2)
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(close):
                i += 1
            setup, skip = (), None
            if pending is not None:
                setup, skip = parse_marker(pending[1], f"{path.name}:{pending[0]}")
            code = textwrap.dedent("\n".join(lines[start + 1 : i]))
            blocks.append(Block(path, start + 1, fence.group(3).lower(), code, setup, skip))
            pending = None
        elif pending is not None and lines[i].strip():
            raise ValueError(f"{path.name}:{pending[0]}: a doc-test marker must stand just "
                             "before a fenced block")  # fmt: skip
        i += 1
    if pending is not None:
        raise ValueError(f"{path.name}:{pending[0]}: a doc-test marker with no block")
    return blocks


def _all_blocks() -> list[Block]:
    try:
        return [b for path in DOC_FILES for b in doc_blocks(path)]
    except ValueError:  # reported by test_every_python_block_runs_or_says_why_not
        return []


PYTHON_BLOCKS = [b for b in _all_blocks() if b.lang in PYTHON]


# --------------------------------------------------------------------- what the blocks need
def _quiet(fn, *args, **kwargs):
    """Run a verb or a training run without its progress output."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


class Artifacts:
    """The files the docs' examples name, each made once per session, on first use."""

    def __init__(self, root: Path) -> None:
        self.root, self.made = root, {}

    def _cli(self, *argv) -> None:
        from dtl.cli import main

        code = _quiet(main, [str(a) for a in argv])
        assert code in (0, None), f"dtl {' '.join(map(str, argv))} exited {code}"

    def get(self, name: str) -> Path:
        if name not in self.made:
            self.made[name] = getattr(self, f"_make_{name}")()
        return self.made[name]

    def _make_tiny_run(self) -> Path:
        """runs/tiny (+ runs/qa, the same run) and data/wt2: a 2-layer, 32-wide model on
        GPT-2's tokenizer, 6 steps on a few paragraphs in 64-token rows."""
        root = self.root / "tiny_run"
        (root / "runs").mkdir(parents=True)
        text = root / "notes.txt"
        text.write_text(CORPUS * 12, encoding="utf-8")
        self._cli("prepare", text, "-o", root / "data" / "wt2", "--max-length", 64,
                  "--val-fraction", 0.2)  # fmt: skip
        self._cli("train", "--data", root / "data" / "wt2", "--out", root / "runs" / "tiny",
                  "--d-model", 32, "--n-heads", 2, "--n-layers", 2, "--d-ff", 64,
                  "--max-steps", 6, "--batch-size", 2, "--eval-every", 3, "--eval-batches", 1,
                  "--no-progress", "--threads", 1)  # fmt: skip
        # a copy, not a link: the server names a model after its dir (model="qa")
        shutil.copytree(root / "runs" / "tiny", root / "runs" / "qa", symlinks=True)
        return root

    def _make_hf_export(self) -> Path:
        from dtl.export import export_model

        out = self.root / "hf_export" / "tiny-hf"
        out.parent.mkdir()
        _quiet(export_model, self.get("tiny_run") / "runs" / "tiny", "hf", out)
        return out

    def _make_onnx_export(self) -> Path:
        from dtl.export import export_model

        out = self.root / "onnx_export" / "tiny-onnx"
        out.parent.mkdir()
        _quiet(export_model, self.get("tiny_run") / "runs" / "tiny", "onnx", out)
        return out

    def _make_legacy_pt(self) -> Path:
        """best_model.pt as the original scripts saved it: a dict holding the state dict."""
        from dtl import ModelConfig, TransformerLM

        config = ModelConfig(vocab_size=97, d_model=32, n_heads=2, n_layers=1, d_ff=64,
                             max_seq_length=64)  # fmt: skip
        path = self.root / "legacy" / "best_model.pt"
        path.parent.mkdir(parents=True)
        torch.save({"epoch": 3, "model_state_dict": TransformerLM(config).state_dict()}, path)
        return path

    def _make_doctest_data(self) -> Path:
        """data/wiki as the loader's docstring has it: rows of 512 tokens."""
        from dtl.data.prepare import prepare

        text = self.root / "doctest" / "wiki.txt"
        text.parent.mkdir(parents=True)
        text.write_text(CORPUS * 40, encoding="utf-8")
        out = self.root / "doctest" / "data" / "wiki"
        _quiet(prepare, [text], out, kind="text", max_length=512, val_fraction=0.2, progress=False)
        return out


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("docs-artifacts"))


def _link(folder: Path, name: str, target: Path) -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(target, target_is_directory=target.is_dir())


@contextlib.contextmanager
def _setups(block: Block, artifacts: Artifacts, folder: Path):
    """Put what the block's marker asks for into `folder`; yields the block's code (with the
    server's address in place of 127.0.0.1:8000 for `server`)."""
    code = block.code
    with contextlib.ExitStack() as stack:
        for name in block.setup:
            if name in ("tiny_run", "server"):
                run = artifacts.get("tiny_run")
                for part in ("runs", "data"):
                    if not (folder / part).exists():
                        _link(folder, part, run / part)
            if name == "hf_export":
                _link(folder, "tiny-hf", artifacts.get("hf_export"))
            if name == "onnx_export":
                _link(folder, "tiny-onnx", artifacts.get("onnx_export"))
            if name == "legacy_pt":
                _link(folder, "best_model.pt", artifacts.get("legacy_pt"))
            if name == "server":
                server = stack.enter_context(_dtl_serve(folder / "runs" / "qa", "s3cret"))
                assert "http://127.0.0.1:8000" in code, f"{block.where}: setup=server, but " \
                    "the block does not name http://127.0.0.1:8000"  # fmt: skip
                code = code.replace("http://127.0.0.1:8000", server.url)
        yield code


@contextlib.contextmanager
def _dtl_serve(model_path: Path, api_key: str):
    """What `dtl serve --model MODEL --api-key KEY` serves, on a free loopback port."""
    from dtl.model import load_model, model_name
    from dtl.serve.api import create_app

    model, tokenizer = load_model(model_path)
    with LiveServer(create_app(model, tokenizer, model_name(model_path), api_key=api_key)) as s:
        yield s


# ---------------------------------------------------------------------------- the blocks
@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if b.skip is None],
                         ids=lambda b: b.where)  # fmt: skip
def test_python_block_runs(block, artifacts, tmp_path, monkeypatch, capsys):
    """The block, as a user pastes it, in an empty folder with what its marker names."""
    with _setups(block, artifacts, tmp_path) as code:
        monkeypatch.chdir(tmp_path)
        exec(compile(code, block.where, "exec"), {"__name__": "__doc_block__"})


def test_every_python_block_runs_or_says_why_not():
    """Markers parse; every ```python fence (counted here with a plain pattern, apart from the
    parser) is one block the test sees; the excused ones give a reason and number EXCUSED."""
    blocks = [b for path in DOC_FILES for b in doc_blocks(path)]  # raises on a bad marker
    fences = sum(len(re.findall(r"(?m)^\s*(?:```+|~~~+)\s*(?:python3?|py)\s*$",
                                path.read_text(encoding="utf-8"))) for path in DOC_FILES)  # fmt: skip
    python = [b for b in blocks if b.lang in PYTHON]
    assert len(python) == fences, "a python block the parser does not see"
    assert python == PYTHON_BLOCKS
    excused = [f"{b.where} ({b.skip})" for b in python if b.skip is not None]
    assert len(excused) == EXCUSED, f"excused python blocks: {excused}; update EXCUSED knowingly"
    assert len(python) - len(excused) >= 6  # README's five examples and docs/data.md's loader


def test_parse_marker_rejects_what_it_cannot_honour():
    assert parse_marker("setup=tiny_run, hf_export", "x") == (("tiny_run", "hf_export"), None)
    assert parse_marker("skip=needs two GPUs (torchrun)", "x") == ((), "needs two GPUs (torchrun)")
    for bad in ("skip=", "setup=a_gpu", "setup=", "run=later"):
        with pytest.raises(ValueError, match="x: "):
            parse_marker(bad, "x")


# ---------------------------------------------------------------------- names and paths
NAME = re.compile(r"(?<![\w.])dtl(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w./-])(?:src/dtl|dtl|benchmarks|tools|tests)/[\w./-]*\w")


def resolves(dotted: str) -> bool:
    """Whether `dtl.a.b.c` is a module, or a module's attribute (chain)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[n:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_dtl_name_and_path_in_the_docs_exists():
    """`dtl.generate.decode.forget`, `dtl/model/head_loss.py`, `benchmarks/bench_decode.py`:
    every one the docs name, in prose, shell or Python, is there."""
    missing = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            for name in NAME.findall(line):
                if not resolves(name):
                    missing.append(f"{path.name}:{number}: {name}")
            for named in PATH.findall(line):
                base = ROOT / "src" if named.startswith("dtl/") else ROOT
                if not (base / named).exists():
                    missing.append(f"{path.name}:{number}: {named}")
    assert not missing, "the docs name what is not there:\n" + "\n".join(missing)


def test_the_name_check_catches_a_rename():
    assert resolves("dtl.generate.decode.forget") and resolves("dtl.model.load_model")
    for gone in ("dtl.loading", "dtl.decode", "dtl.serve.engine", "dtl.generate.nothing"):
        assert not resolves(gone), gone


def _command_lines(block: Block) -> list[str]:
    """The `dtl ...` commands of a bash/console block (a console block's after `$ `), joined
    across trailing backslashes; lines with `...` (elided arguments) are left out."""
    lines, joined = [], ""
    for raw in block.code.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not line.startswith("$ ") and not joined:
                continue
            line = line.removeprefix("$ ")
        joined += line
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        if joined.startswith("dtl ") and "..." not in joined:
            lines.append(joined)
        joined = ""
    return lines


SHELL_OPERATORS = {"&", "&&", "||", "|", ";", "<", "2>", "2>&1"}


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Make `parser` and its verbs' parsers refuse `--max-step` for `--max-steps`: the docs
    should spell each flag as it is."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def bad_commands(blocks: list[Block]) -> tuple[int, list[str]]:
    """(how many `dtl` command lines the shell blocks hold, those `dtl`'s parser refuses)."""
    from dtl.cli import build_parser

    parser, bad, seen = build_parser(), [], 0
    _no_abbreviations(parser)
    for block in blocks:
        if block.lang not in ("bash", "console", "sh", "shell"):
            continue
        for line in _command_lines(block):
            words = shlex.split(line, comments=True)[1:]
            ends = [i for i, w in enumerate(words) if w in SHELL_OPERATORS or w.startswith(">")]
            words = words[: ends[0]] if ends else words  # `dtl serve ... &`, `... > log`
            seen += 1
            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    parser.parse_args(words)
            except SystemExit:
                bad.append(f"{block.where}: {line}\n    {err.getvalue().strip().splitlines()[-1]}")
    return seen, bad


def test_every_dtl_command_in_the_docs_parses():
    """Each `dtl VERB --flag ...` line of a bash or console block is one that `dtl`'s parser
    takes: a renamed verb or flag fails here."""
    seen, bad = bad_commands([b for path in DOC_FILES for b in doc_blocks(path)])
    assert seen >= 30 and not bad, "\n".join(bad)


def test_the_command_check_catches_a_renamed_flag():
    block = Block(Path("x.md"), 1, "console", "$ dtl train --data d --max-step 5\nstep 5\n"
                  "$ dtl ask --model runs/qa \\\n    \"Who?\" > answer.txt\n$ dtl gen --model m")
    seen, bad = bad_commands([block])
    assert seen == 3 and [b.split()[2] for b in bad] == ["train", "gen"], bad


# ------------------------------------------------------------------- docstring examples
MODULES = sorted(
    ".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "src" / "dtl").rglob("*.py")
    if p.name != "__main__.py"  # importing it runs the CLI
)


@pytest.fixture(scope="session")
def doctest_globals(artifacts) -> dict:
    from dtl.model import load_model

    run = artifacts.get("tiny_run")
    model, tokenizer = load_model(run / "runs" / "tiny")
    return {"model": model.eval(), "tokenizer": tokenizer}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, artifacts, doctest_globals, tmp_path, monkeypatch):
    """The module's `>>>` examples, in a folder with runs/tiny, my-export/ (hf), tiny-onnx/
    and data/wiki."""
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name, extraglobs=doctest_globals)
    if not any(t.examples for t in tests):
        return
    _link(tmp_path, "runs/tiny", artifacts.get("tiny_run") / "runs" / "tiny")
    _link(tmp_path, "my-export", artifacts.get("hf_export"))
    _link(tmp_path, "tiny-onnx", artifacts.get("onnx_export"))
    _link(tmp_path, "data/wiki", artifacts.get("doctest_data"))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()
