"""The server's batching scheduler: one thread generates for every request, by continuous
batching (`dtl.generate.batch`).

Between two decode steps, waiting requests join the running batch (up to MAX_BATCH_ROWS rows
that fit the context, first come first served) and finished or abandoned ones leave it. Each
request keeps its own options and seeded generator, so it gets what it would get alone, and
none ever sees another's KV cache rows. A request whose own work fails (its prefill, its draw)
fails alone; should the batch's forward fail, the requests in it hear of it, and the worker
goes on with the next ones. A request whose client has gone (`job.cancelled`) is dropped
at its next step; one still waiting never holds up those behind it.

A request with `echo` has its prompts scored first (`prompt_logprobs`, one forward of each
prompt, on this thread, set on the request before its first piece); one with `score_only`
(OpenAI's `max_tokens: 0`) then ends without joining the batch.

A `Job` is the server's record of a request: the generation `Request` and its transport,
where its pieces go (`send`, called on this thread: `StreamChunk`s, an Exception if it
failed, and END last) and whether its client has left (`cancelled`). `dtl.generate` never
sees the transport.

>>> batcher = Batcher(app.state)                   # doctest: +SKIP
>>> batcher.submit(Job(request, send=queue.put))   # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from dtl.generate.batch import ContinuousBatch
from dtl.generate.loop import Request
from dtl.generate.score import prompt_logprobs

MAX_BATCH_ROWS = 16
END = object()  # a request's last item


@dataclass(eq=False)
class Job:
    """A request and who asked for it: `send(item)` takes its pieces (on the generation
    thread), `cancelled` is set (on any thread) when its client leaves."""

    request: Request
    send: Callable[[object], None]
    cancelled: bool = False


class Batcher:
    """The one thread that generates for every request (see the module docs)."""

    def __init__(self, state) -> None:
        self.state = state  # the app's: model, tokenizer, and the counters below
        self.pending: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}  # id(request) -> its job, for those in the batch
        self.batch = ContinuousBatch(state.model, state.tokenizer, MAX_BATCH_ROWS)
        self.ready = threading.Condition()
        threading.Thread(target=self._loop, name="dtl-generate", daemon=True).start()

    @property
    def running(self) -> list[Job]:
        """The jobs being decoded now (for tests and operators)."""
        requests = list(self.batch.requests)  # a copy: another thread may read mid-change
        return [self.jobs[id(r)] for r in requests if id(r) in self.jobs]

    def submit(self, job: Job) -> None:
        with self.ready:
            self.pending.append(job)
            self.ready.notify()

    def _next(self, joining: list[Job]) -> Job | None:
        """The first waiting job if it can join the batch now, beside those `joining` it
        already (waiting for one if nothing runs or joins)."""
        with self.ready:
            while not self.batch and not joining and not self.pending:
                self.ready.wait()
            while self.pending and self.pending[0].cancelled:  # never queue behind a request
                self.state.cancelled += 1  # whose client has left
                _end(self.pending.popleft())
            if not self.pending:
                return None
            if self.pending[0].request.score_only:  # never joins the batch: nothing to fit
                return self.pending.popleft()
            if self.batch.fits([j.request for j in (*joining, self.pending[0])]):
                return self.pending.popleft()
        return None

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together and add them to the batch; if that fails, each alone,
        so that a request whose own prefill fails fails alone."""
        try:
            self.batch.add([j.request for j in jobs])
            self.jobs.update((id(j.request), j) for j in jobs)
            return
        except Exception as err:
            if len(jobs) == 1:
                _end(jobs[0], err)
                return
        for job in jobs:
            try:
                self.batch.add([job.request])
                self.jobs[id(job.request)] = job
            except Exception as err:  # this request's own failure: only it hears of it
                _end(job, err)

    def _score(self, job: Job) -> bool:
        """Score the request's prompts (`echo`); False if that failed (it has then ended)."""
        request = job.request
        top_n = request.options.logprobs or 0
        try:
            scored: dict[tuple[int, ...], list] = {}  # its n copies of a prompt: scored once
            for ids in request.prompt_ids:
                if tuple(ids) not in scored:
                    scored[tuple(ids)] = prompt_logprobs(self.state.model, ids, top_n)
            request.prompt_logprobs = [scored[tuple(ids)] for ids in request.prompt_ids]
        except Exception as err:  # this request's own failure: only it hears of it
            _end(job, err)
            return False
        return True

    def _loop(self) -> None:
        while True:
            joining: list[Job] = []
            while (job := self._next(joining)) is not None:
                request = job.request
                if request.echo and request.options.logprobs is not None and not self._score(job):
                    continue
                if request.score_only:
                    _end(job)
                    continue
                joining.append(job)
            if joining:
                self._admit(joining)
            self.state.largest_batch = max(self.state.largest_batch, self.batch.n_rows)
            for job in self.running:
                if job.cancelled:  # the client left mid-generation
                    self.state.cancelled += 1
                    self.batch.drop(job.request)
                    self._end(job)
            if self.batch:
                self._step()

    def _step(self) -> None:
        running = self.running
        try:
            items = self.batch.step()  # a failed draw or forward comes back as an item
        except Exception as err:  # a bug of ours: nobody may be left waiting
            self.batch.clear()
            for job in running:
                self._end(job, err)
            return
        failed = set()
        for request, item in items:
            if id(request) in failed:
                continue
            if isinstance(item, Exception):
                failed.add(id(request))
                self._end(self.jobs[id(request)], item)
            else:
                self.jobs[id(request)].send(item)
        for job in running:  # those that finished this step
            if job.request.finished and id(job.request) not in failed:
                self._end(job)

    def _end(self, job: Job, err: Exception | None = None) -> None:
        """A job of the batch ends: it is forgotten, and hears its last items."""
        self.jobs.pop(id(job.request), None)
        _end(job, err)


def _end(job: Job, err: Exception | None = None) -> None:
    """The job's last items: the error it failed with, if any, then END."""
    if err is not None:
        job.send(err)
    job.send(END)
