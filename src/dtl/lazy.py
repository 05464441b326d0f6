"""Package names imported on first use (PEP 562), so `import dtl` costs no torch.

Most of DTL runs a model and needs torch (~2 s and ~200 MB a process to import); `dtl extract`
never does. A package lists the names it exports and the module each comes from; `from dtl
import TransformerLM` then imports that module at that moment.

>>> __getattr__, __dir__ = lazy_exports(__name__, {"TransformerLM": "dtl.model.transformer"})  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package whose exported name may also be a submodule's (`dtl.data.prepare`, the
    function, in `dtl/data/prepare.py`): the import system binds each loaded submodule on its
    package, which would hide the function; the name stays the function's, as an eager
    `from dtl.data.prepare import prepare` in the package left it."""

    def __setattr__(self, name: str, value: Any) -> None:
        exported = self.__dict__.get("_lazy_names", {})
        if isinstance(value, types.ModuleType) and value.__name__ == exported.get(name):
            return  # looked up through __getattr__: the module's own `name`
        super().__setattr__(name, value)


def lazy_exports(
    package: str, names: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module-level `__getattr__` and `__dir__` serving `names` (name -> module)."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module.__dict__["_lazy_names"] = names

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        module.__dict__[name] = value  # later look-ups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(module.__dict__) | set(names))

    return __getattr__, __dir__
