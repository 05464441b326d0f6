"""The layout's rules that a change could quietly break (docs/layout.md): generation knows
nothing of serving (a request carries no transport), and no CLI module reaches into another's
private names."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from testkit import PROJECT_ROOT

from dtl.generate.loop import Request

SRC = PROJECT_ROOT / "src" / "dtl"


def imported(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a source file (names empty for `import m`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_generation_knows_nothing_of_serving():
    for path in sorted((SRC / "generate").glob("*.py")):
        for module, _ in imported(path):
            assert not module.startswith(("dtl.serve", "dtl.cli", "dtl.train")), (path, module)
    fields = {f.name for f in dataclasses.fields(Request)}
    assert not fields & {"send", "cancelled"}  # the server's Job holds its transport


def test_cli_modules_share_only_public_names():
    for path in sorted((SRC / "cli").glob("*.py")):
        for module, names in imported(path):
            if module.startswith("dtl.cli"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} imports {private} from {module}"
