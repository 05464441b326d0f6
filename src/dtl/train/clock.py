"""How far a run is: its training clock (`dtl train --max-time`) and `run_progress`, the one
rule that every part reads (the lr schedule, the stop, the log).

A run is bounded by steps (`--max-steps`), by minutes of training (`--max-time`), or by both
(it stops at whichever comes first). The training clock counts what trains: the steps, their
data loading and logging, the first step's warm-up or compile included (it is real time).
Evaluation and checkpoint saving pause it, so `--eval-every 10` buys as many training steps as
`--eval-every 1000`. A resumed run's clock starts at the time its checkpoint had trained.

>>> clock = TrainClock(now=iter([0.0, 2.0, 7.0, 9.0]).__next__)
>>> clock.start()                      # at 0 s
>>> with clock.paused():               # from 2 s to 7 s: an evaluation, not counted
...     pass
>>> clock.seconds()                    # at 9 s: 9 - 5 s of evaluation
4.0
>>> run_progress(step=30, trained_s=150.0, max_steps=None, budget_s=600.0).fraction
0.25
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# A time-bounded run's schedule reads its progress on a grid of this many ticks: the lr
# rule (`dtl.train.optim.lr_at`) counts steps, and a million ticks make its "+1 step" (no
# step runs at lr 0) a millionth of the budget. Step-bounded runs count their own steps.
SCHEDULE_TICKS = 1_000_000


@dataclass(frozen=True)
class Progress:
    """Where a run is: `done` of `total` ticks (steps; or, under --max-time, SCHEDULE_TICKS).

    >>> Progress(250, 1000).fraction, Progress(1000, 1000).finished
    (0.25, True)
    """

    done: float
    total: float

    @property
    def fraction(self) -> float:
        """The share of the run done, in [0, 1]."""
        return min(1.0, self.done / self.total)

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def run_progress(
    step: int, trained_s: float, max_steps: int | None, budget_s: float | None
) -> Progress:
    """The run's progress after `step` steps and `trained_s` seconds on the training clock.

    Without a time budget it is `step` of `max_steps` (the ticks are the steps, so the
    schedule is exactly the step rule). With one (`budget_s`, --max-time in seconds) it is the
    share of the budget spent, or of `max_steps` when that is further along: the run stops
    when either is spent, and the lr reaches its floor at the end whichever ends it.

    >>> run_progress(40, 0.0, 200, None)
    Progress(done=40, total=200)
    >>> run_progress(40, 30.0, 200, 60.0).fraction   # half the time, a fifth of the steps
    0.5
    """
    if budget_s is None:
        if max_steps is None:
            raise ValueError("a run needs max_steps or a time budget")
        return Progress(step, max_steps)
    fraction = trained_s / budget_s
    if max_steps is not None:
        fraction = max(fraction, step / max_steps)
    return Progress(min(1.0, fraction) * SCHEDULE_TICKS, SCHEDULE_TICKS)


class TrainClock:
    """Seconds spent training: from `trained_s` (a resumed run's), counting from `start()`,
    not counting what runs inside `paused()` (evaluation, saving). `now` is any monotonic
    clock in seconds (time.perf_counter; a fake one in tests)."""

    def __init__(self, trained_s: float = 0.0, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._base = trained_s
        self._start: float | None = None
        self._depth = 0  # nested pauses (a save inside an evaluation's pause) count once
        self._began = 0.0  # when the current pause began

    def start(self) -> None:
        self._start = self._now()

    def seconds(self) -> float:
        """The seconds trained so far (the resumed run's included); inside `paused()`, the
        seconds when the pause began."""
        if self._start is None:
            return self._base
        return self._base + ((self._began if self._depth else self._now()) - self._start)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """What runs inside is not training time."""
        if self._depth == 0:
            self._began = self._now()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._start is not None:
                self._start += self._now() - self._began  # the pause moves the start forward
