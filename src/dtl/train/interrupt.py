"""Ctrl-C during training: the first one (or a SIGTERM) asks the loop to stop after the
current step and save; a second one interrupts at once.

>>> with StopFlag() as stop:  # doctest: +SKIP
...     while not stop.requested:
...         step()
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any


class StopFlag:
    """`requested` turns true on the first SIGINT/SIGTERM inside the `with` block; the
    previous handlers come back on leaving it."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
