"""The server's batching scheduler: one thread generates for every request, by continuous
batching (`dtl.generate.batch`).

Between two decode steps, waiting requests join the running batch (up to MAX_BATCH_ROWS rows
that fit the context, first come first served) and finished or abandoned ones leave it. Each
request keeps its own options and seeded generator, so it gets what it would get alone, and
none ever sees another's KV cache rows. A request whose own work fails (its prefill, its draw)
fails alone; should the batch's forward fail, the requests in it hear of it, and the worker
goes on with the next ones. A request whose client has gone (`request.cancelled`) is dropped
at its next step; one still waiting never holds up those behind it.

A request with `echo` has its prompts scored first (`prompt_logprobs`, one forward of each
prompt, on this thread, set on the request before its first piece); one with `score_only`
(OpenAI's `max_tokens: 0`) then ends without joining the batch.

Each request's pieces go to its `send` (called on this thread): `StreamChunk`s, an Exception
if it failed, and END last.

>>> batcher = Batcher(app.state)      # doctest: +SKIP
>>> batcher.submit(request)           # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections import deque

from dtl.generate.batch import ContinuousBatch
from dtl.generate.loop import Request
from dtl.generate.score import prompt_logprobs

MAX_BATCH_ROWS = 16
END = object()  # a request's last item


class Batcher:
    """The one thread that generates for every request (see the module docs)."""

    def __init__(self, state) -> None:
        self.state = state  # the app's: model, tokenizer, and the counters below
        self.pending: deque[Request] = deque()
        self.batch = ContinuousBatch(state.model, state.tokenizer, MAX_BATCH_ROWS)
        self.ready = threading.Condition()
        threading.Thread(target=self._loop, name="dtl-generate", daemon=True).start()

    @property
    def running(self) -> list[Request]:
        """The requests being decoded now (for tests and operators)."""
        return list(self.batch.requests)  # a copy: another thread may read mid-change

    def submit(self, request: Request) -> None:
        with self.ready:
            self.pending.append(request)
            self.ready.notify()

    def _next(self, joining: list[Request]) -> Request | None:
        """The first waiting request if it can join the batch now, beside those `joining` it
        already (waiting for one if nothing runs or joins)."""
        with self.ready:
            while not self.batch and not joining and not self.pending:
                self.ready.wait()
            while self.pending and self.pending[0].cancelled:  # never queue behind a request
                self.state.cancelled += 1  # whose client has left
                _end(self.pending.popleft())
            if not self.pending:
                return None
            if self.pending[0].score_only:  # never joins the batch: nothing to fit
                return self.pending.popleft()
            candidates = [*joining, self.pending[0]]
            rows = sum(len(r.prompts) for r in candidates)
            if joining and self.batch.n_rows + rows > MAX_BATCH_ROWS:
                return None  # (one request alone may be larger, in an empty batch)
            longest = max(len(ids) for r in candidates for ids in r.prompt_ids)
            max_new = max(r.options.max_new_tokens for r in candidates)
            if self.batch.fits(rows, longest, max_new):
                return self.pending.popleft()
        return None

    def _admit(self, requests: list[Request]) -> None:
        """Prefill `requests` together and add them to the batch; if that fails, each alone,
        so that a request whose own prefill fails fails alone."""
        try:
            self.batch.add(requests)
            return
        except Exception as err:
            if len(requests) == 1:
                _end(requests[0], err)
                return
        for request in requests:
            try:
                self.batch.add([request])
            except Exception as err:  # this request's own failure: only it hears of it
                _end(request, err)

    def _score(self, request: Request) -> bool:
        """Score the request's prompts (`echo`); False if that failed (it has then ended)."""
        top_n = request.options.logprobs or 0
        try:
            scored: dict[tuple[int, ...], list] = {}  # its n copies of a prompt: scored once
            for ids in request.prompt_ids:
                if tuple(ids) not in scored:
                    scored[tuple(ids)] = prompt_logprobs(self.state.model, ids, top_n)
            request.prompt_logprobs = [scored[tuple(ids)] for ids in request.prompt_ids]
        except Exception as err:  # this request's own failure: only it hears of it
            _end(request, err)
            return False
        return True

    def _loop(self) -> None:
        while True:
            joining: list[Request] = []
            while (request := self._next(joining)) is not None:
                if request.echo and request.options.logprobs is not None and not self._score(request):
                    continue
                if request.score_only:
                    _end(request)
                    continue
                joining.append(request)
            if joining:
                self._admit(joining)
            self.state.largest_batch = max(self.state.largest_batch, self.batch.n_rows)
            for request in self.running:
                if request.cancelled:  # the client left mid-generation
                    self.state.cancelled += 1
                    self.batch.drop(request)
                    _end(request)
            if self.batch:
                self._step()

    def _step(self) -> None:
        running = self.running
        try:
            items = self.batch.step()  # a failed draw or forward comes back as an item
        except Exception as err:  # a bug of ours: nobody may be left waiting
            self.batch.clear()
            for request in running:
                _end(request, err)
            return
        failed = set()
        for request, item in items:
            if id(request) in failed:
                continue
            if isinstance(item, Exception):
                failed.add(id(request))
                _end(request, item)
            else:
                request.send(item)
        for request in running:  # those that finished this step
            if request.finished and id(request) not in failed:
                _end(request)


def _end(request: Request, err: Exception | None = None) -> None:
    """The request's last items: the error it failed with, if any, then END."""
    if err is not None:
        request.send(err)
    request.send(END)
