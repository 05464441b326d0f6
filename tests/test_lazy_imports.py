"""`dtl extract` never loads torch (dtl.lazy, and `dtl VERB` importing VERB's module alone):
~2 s and ~200 MB a process it never used. The other names and verbs still work."""

from __future__ import annotations

import argparse
import bz2
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from testkit import PROJECT_ROOT

from dtl.cli import COMMAND_MODULES, build_parser
from dtl.corpus import corpus_files
from dtl.data.dumps import split_export, write_multistream

# Runs `dtl` in a fresh interpreter with an audit hook, inherited by forked workers, that
# notes every process which imports torch.
SCRIPT = """
import os, sys
marker = sys.argv[1]
def hook(event, args):
    if event == "import" and args[0] == "torch":
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\\n")
sys.addaudithook(hook)
from dtl.cli import main
code = main(sys.argv[2:])
print("torch" in sys.modules)
sys.exit(code)
"""


def run_dtl(tmp_path: Path, *argv: str) -> tuple[str, str]:
    """(stdout, the marker file's text: one line per process that imported torch)."""
    marker = tmp_path / "torch-imports.txt"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(marker), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, marker.read_text() if marker.exists() else ""


def test_extract_of_a_multistream_dump_imports_no_torch_in_any_process(tmp_path):
    header, pages = split_export(bz2.decompress(corpus_files()[0].read_bytes()).decode("utf-8"))
    dump = tmp_path / "t-pages-articles-multistream.xml.bz2"
    write_multistream(header, pages, dump, per_stream=20)
    out = tmp_path / "wiki.jsonl"
    stdout, imports = run_dtl(tmp_path, "extract", str(dump), "-o", str(out), "--processes", "2")
    assert imports == "", f"processes that imported torch: {imports.split()}"
    assert stdout.splitlines()[-1] == "False"
    records = [json.loads(line) for line in out.open(encoding="utf-8")]
    assert len(records) > 50 and records[0]["title"] == "Anarchism"


def test_the_hook_sees_a_verb_that_does_load_torch(tmp_path):
    # The same harness on `dtl info`, which builds a model config and imports torch: the
    # check above can fail.
    _, imports = run_dtl(tmp_path, "info", "--preset", "tiny")
    assert imports.strip()


def test_every_module_registers_exactly_the_verbs_the_table_names():
    for module, verbs in COMMAND_MODULES.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert tuple(sub.choices) == verbs, module
    listed = build_parser()._subparsers._group_actions[0].choices
    assert list(listed) == [v for verbs in COMMAND_MODULES.values() for v in verbs]


def test_a_named_verb_parses_as_with_every_verb_registered():
    argv = ["--debug", "extract", "d.xml.bz2", "-o", "x.jsonl", "--processes", "3"]
    assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_the_public_names_resolve_to_their_homes():
    import dtl
    import dtl.data
    import dtl.data.prepare  # the submodule loaded must not hide the function of its name
    import dtl.model
    from dtl.data.prepare import prepare
    from dtl.model.config import PRESETS, ModelConfig
    from dtl.model.transformer import KVCache, TransformerLM

    assert (dtl.TransformerLM, dtl.KVCache, dtl.ModelConfig) == (
        TransformerLM,
        KVCache,
        ModelConfig,
    )
    assert dtl.PRESETS is PRESETS and dtl.data.prepare is prepare
    assert dtl.model.TransformerLM is TransformerLM
    assert set(dtl.__all__) <= set(dir(dtl))
    assert set(dtl.data.__all__) <= set(dir(dtl.data))
    assert all(getattr(dtl.model, name) is not None for name in dtl.model.__all__)
