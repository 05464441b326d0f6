"""What every request to `dtl serve` passes before any route sees it (one ASGI middleware):

- its `Host` header names this server: `localhost`, an IP address, or a name given with
  `--allowed-hosts` (else 400 `invalid_host`). A web page that re-points its own DNS name at
  127.0.0.1 (DNS rebinding) sends that name as Host, so it cannot reach a local server; a
  Host that is an IP address cannot be rebound, so IP addresses always pass;
- a POST carries `Content-Type: application/json` (else 415): a cross-site page can send
  `text/plain` without asking the browser's permission (no CORS preflight), JSON it cannot;
- its body is at most `max_body_bytes` (else 413, known from its Content-Length, or as soon
  as a chunked body grows past the limit). The refused body is still read and thrown away, up
  to `DRAIN_BYTES`, before the 413 goes out: a client such as urllib sends its whole body
  before it reads anything, and a server that closes the connection on unread data makes the
  kernel answer with a reset, so that client sees `ConnectionResetError` instead of the 413
  (nginx's discarded body and lingering close, Go's read-ahead of 256 KB, for the same
  reason). A body that states more than `DRAIN_BYTES`, or one that asked first
  (`Expect: 100-continue`), is answered at once, unread: no client makes the server read
  gigabytes, and the clients that read while they send (httpx, the openai SDK, curl) still
  see the 413.

Refusals come back in OpenAI's error shape, like every other error of the API.

>>> from fastapi import FastAPI
>>> app = RequestGuard(FastAPI(), allowed_hosts=["gpu-box.lan"], max_body_bytes=4 << 20)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from dtl.serve.wire import ApiError

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: a 64-prompt request filling a 4k context is ~1 MB
# At most this much of a refused body is read (and dropped) so that the client sees the 413:
# 16 default limits, well under a second on a local network, never kept in memory.
DRAIN_BYTES = 64 << 20
LOCAL_NAMES = ("localhost",)


def host_name(header: str) -> str:
    """The name part of a Host header, lower-cased, without port or trailing dot.

    >>> host_name("LocalHost:8000"), host_name("[::1]:8000"), host_name("example.com.")
    ('localhost', '::1', 'example.com')
    """
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal, [::1] or [::1]:8000
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if ":" in header else header.rstrip(".")


def host_allowed(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether a request with this Host header may be served (see the module docs); a
    request without one (HTTP/1.0) comes from no browser and passes."""
    if header is None:
        return True
    allowed = {a.lower().rstrip(".") for a in allowed}
    name = host_name(header)
    if "*" in allowed or name in allowed or name in LOCAL_NAMES:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


class RequestGuard:
    """ASGI middleware: the checks of the module docs, before `app` sees the request."""

    def __init__(
        self, app, allowed_hosts: Iterable[str] = (),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:  # fmt: skip
        self.app, self.allowed, self.limit = app, tuple(allowed_hosts), max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is None and scope["method"] == "POST":
            refusal, receive = await self._within_limit(headers, receive)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope, headers: dict[str, str]) -> ApiError | None:
        host = headers.get("host")
        # Starlette's in-process TestClient ("testclient", Host "testserver") is no browser
        in_process = (scope.get("client") or ("",))[0] == "testclient"
        if not in_process and not host_allowed(host, self.allowed):
            return ApiError(
                f"Host {host!r} is not one of this server's names (localhost, an IP address, "
                "or those given to dtl serve --allowed-hosts); to reach it by this name, "
                f"start it with --allowed-hosts {host_name(host or '')}",
                code="invalid_host",
            )
        if scope["method"] == "POST" and not _is_json(headers.get("content-type", "")):
            given = headers.get("content-type", "none")
            return ApiError(
                f"the request body must be JSON sent with 'Content-Type: application/json' "
                f"(got {given!r})",
                code="unsupported_media_type",
                status=415,
            )
        return None

    async def _within_limit(self, headers: dict[str, str], receive):
        """(None, a receive that hands the app the body) when the body fits the limit, else
        (the 413, receive). A body that states its length is judged by it (and never read
        past it); a chunked one is read here up to the limit. A refused body is drained (see
        the module docs) before the caller answers."""
        length = headers.get("content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                if int(length) <= DRAIN_BYTES and not _asks_first(headers):
                    await _drain(receive, 0)
                return self._too_large(int(length)), receive
            return None, receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks.append(b"")
                return None, _replay(chunks, message, receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                if more and not _asks_first(headers):
                    await _drain(receive, size)
                return self._too_large(None), receive
        return None, _replay(chunks, None, receive)

    def _too_large(self, length: int | None) -> ApiError:
        size = f"{length:,} bytes" if length is not None else "more"
        return ApiError(
            f"the request body is {size}; this server takes at most {self.limit:,} bytes "
            "(dtl serve --max-body-mb); a prompt that long would not fit the model's context "
            "anyway",
            code="request_too_large",
            status=413,
        )


def _asks_first(headers: dict[str, str]) -> bool:
    """Whether the client waits for `100 Continue` before it sends its body: it has sent
    nothing yet, so there is nothing to drain (and reading would ask it for the body)."""
    return headers.get("expect", "").strip().lower() == "100-continue"


async def _drain(receive, size: int) -> None:
    """Read and drop the rest of a refused body, `size` bytes of it already read, until it
    ends, the client leaves, or `DRAIN_BYTES` have been read (then the connection closes on
    the rest, as it did before)."""
    more = True
    while more and size <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)


def _replay(chunks: list[bytes], last, receive):
    """A receive that first gives the body already read (then `last`, if any), then the
    client's own messages (its disconnect)."""
    pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
    if last is not None:
        pending.append(last)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed
