"""CPU threads for the model: how many, and how the idle ones wait.

Torch's CPU kernels run on an OpenMP pool (libgomp). By default an idle pool thread spins,
burning its core for up to ~300,000 loop turns, before it sleeps. On a machine of its own that
shaves microseconds off each kernel; beside one other busy process the spinning threads take
the cores that the threads doing the work need, and everything slows 5-10x (issue 14: a tiny
`dtl train` at 700 tokens/s instead of 5,100; `dtl generate` 12-18 s instead of 1.5 s).
So DTL sets `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep at once) before torch loads, unless
the user set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` themselves; measured on 2 cores with a
2-thread competitor, 2 passive threads beat 1 thread and both beat 2 spinning threads, and on
a free machine passive costs nothing measurable (`benchmarks/bench_threads.py`).

The verbs that decode token by token (`DECODE_VERBS`) take a short spin instead
(`GOMP_SPINCOUNT=DECODE_SPINCOUNT`, then sleep): a one-row decode step is ~30 parallel kernels
of a few microseconds each, and waking a sleeping thread for every one of them cost a quarter
of onnxruntime's speed at batch 1 (docs/benchmarks.md). The spin is short enough to bridge the
gaps between one step's kernels, and an idle thread still sleeps soon after, so a busy machine
is not starved (measured with `bench_threads.py`). `dtl VERB` chooses by its verb before torch
loads (`set_wait_policy(verb=...)`, from `dtl.cli.main`).

The number of threads is one per usable core (torch's own default), or what `--threads`
says; under torchrun each of the machine's ranks gets its share of the cores; an explicit
`OMP_NUM_THREADS` is kept. Every verb that runs a model says its choice in its first line
(`environ` as `import dtl` leaves it when the user set no policy):

>>> choose_threads(None, cores=2, environ={"OMP_WAIT_POLICY": "PASSIVE"}).line()
'threads: 2 (one per core of 2; idle threads sleep; --threads N to override)'
>>> choose_threads(None, cores=2, environ={"OMP_WAIT_POLICY": "ACTIVE"}).line()
'threads: 2 (one per core of 2; spin-wait; --threads N to override)'
>>> choose_threads(1, cores=2, environ={}).threads
1
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from dtl.errors import DtlError

# Set before torch is imported (libgomp reads it once, when it loads): see the module docs.
WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
DECODE_VERBS = ("generate", "ask", "chat", "serve")
DECODE_SPINCOUNT = 2000  # spin turns before sleeping: ~tens of microseconds
DECODE_POLICY = {"GOMP_SPINCOUNT": str(DECODE_SPINCOUNT)}
_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def wait_policy(verb: str | None = None) -> dict[str, str]:
    """The OpenMP wait settings DTL uses for `dtl VERB` (None: anything else, `import dtl`).

    >>> wait_policy("train"), wait_policy("generate")
    ({'OMP_WAIT_POLICY': 'PASSIVE'}, {'GOMP_SPINCOUNT': '2000'})
    """
    return dict(DECODE_POLICY if verb in DECODE_VERBS else WAIT_POLICY)


def set_wait_policy(environ: dict = os.environ, verb: str | None = None) -> None:  # type: ignore[assignment]
    """Set `wait_policy(verb)` in `environ`, unless the user chose a policy: for the process
    environment, one that held `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` before `import dtl`
    (so DTL may replace its own setting by a verb's); for another mapping, one that holds
    either. Only takes effect before torch is imported.

    >>> env = {}; set_wait_policy(env, verb="chat"); env
    {'GOMP_SPINCOUNT': '2000'}
    """
    users = _USERS if environ is os.environ else {k: environ[k] for k in _KEYS if k in environ}
    if users:
        return
    for key in _KEYS:
        environ.pop(key, None)
    environ.update(wait_policy(verb))


_USERS = {k: os.environ[k] for k in _KEYS if k in os.environ}  # before DTL sets either


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads, and why (said in the verb's first log line)."""

    threads: int
    why: str

    def line(self) -> str:
        return f"threads: {self.threads} ({self.why}; --threads N to override)"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a cgroup
    cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def choose_threads(
    asked: int | None, cores: int | None = None, environ: Mapping[str, str] = os.environ
) -> ThreadChoice:
    """The threads for `--threads asked` (None: the default) on `cores` usable cores."""
    cores = usable_cores() if cores is None else cores
    if asked is not None:
        if asked < 1:
            raise DtlError(f"--threads {asked}: give at least 1 (default: one per core, {cores})")
        if asked > cores:
            return ThreadChoice(asked, f"as asked, more than the {cores} cores: they take turns")
        return ThreadChoice(asked, f"as asked, of {cores} cores")
    ranks = _int(environ.get("LOCAL_WORLD_SIZE")) or 1
    if ranks > 1:  # torchrun: this machine's ranks share its cores
        share = max(1, cores // ranks)
        return ThreadChoice(share, f"{cores} cores shared by {ranks} processes")
    omp = _int(environ.get("OMP_NUM_THREADS"))
    if omp:
        return ThreadChoice(omp, f"OMP_NUM_THREADS, of {cores} cores")
    if environ.get("OMP_WAIT_POLICY") == "PASSIVE":
        waits = "idle threads sleep"
    elif "GOMP_SPINCOUNT" in environ and environ.get("OMP_WAIT_POLICY") != "ACTIVE":
        waits = f"idle threads spin {environ['GOMP_SPINCOUNT']} turns, then sleep"
    else:
        waits = "spin-wait"
    return ThreadChoice(cores, f"one per core of {cores}; {waits}")


def apply_threads(asked: int | None, say: bool = True) -> ThreadChoice:
    """Choose the threads (see `choose_threads`), give them to torch, and say so on stderr.

    >>> apply_threads(1, say=False).threads
    1
    """
    import torch

    choice = choose_threads(asked)
    torch.set_num_threads(choice.threads)
    if say:
        print(choice.line(), file=sys.stderr, flush=True)
    return choice


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None
