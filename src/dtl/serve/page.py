"""The web page `dtl serve` shows at `/`: plain HTML/CSS/JS shipped inside the package.

The page is a client of the server's own OpenAI-compatible API (`/v1/models`,
`/v1/chat/completions`, `/v1/completions`); this module only hands out its files. Nothing is
fetched from anywhere else (no CDN, fonts or external scripts), and the Content-Security-Policy
header below makes the browser enforce that, so the page works on a machine with no network.

>>> from fastapi import FastAPI
>>> app = FastAPI()
>>> add_page_routes(app)  # GET / -> the page, GET /static/... -> its script and style
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response

from dtl.generate.sampling import ASK_DEFAULTS, SamplingOptions, ask_options

STATIC_DIR = Path(__file__).resolve().with_name("static")

# Only this origin may supply scripts, styles, images and API responses; no inline script.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # A new `pip install` must not be masked by a browser's cached old script.
    "Cache-Control": "no-cache",
}

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _static_file(name: str) -> Path | None:
    """The shipped file `name` (a bare file name), or None: no paths outside STATIC_DIR."""
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    path = STATIC_DIR / name
    return path if path.suffix in MEDIA_TYPES and path.is_file() else None


def ask_defaults(options: SamplingOptions = ASK_DEFAULTS) -> dict:
    """`dtl ask`'s settings as chat-completion body fields: what the Ask tab starts from.

    >>> ask_defaults()["temperature"], ask_defaults()["stop"]
    (0.0, ['\\nQuestion:', '\\nAnswer:'])
    """
    options = ask_options(options)
    return {
        "temperature": options.temperature,
        "top_k": options.top_k or 0,
        "top_p": options.top_p or 1.0,
        "repetition_penalty": options.repetition_penalty,
        "no_repeat_ngram_size": options.no_repeat_ngram_size,
        "max_tokens": options.max_new_tokens,
        "stop": list(options.stop),  # informative: chat completions add them anyway
    }


def _file_response(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)


def add_page_routes(app: FastAPI) -> None:
    """Serve the page at `/` and its files at `/static/NAME` on `app`.

    These routes never need the API key: the page itself asks for the key (when a request
    answers 401) and sends it as `Authorization: Bearer KEY` on its API calls.
    """

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page() -> FileResponse:
        return _file_response(STATIC_DIR / "index.html")

    @app.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    def static(name: str) -> Response:
        path = _static_file(name)
        if path is None:
            return Response(f"no such file: /static/{name}\n", status_code=404)
        return _file_response(path)

    @app.get("/ask_defaults", include_in_schema=False)
    def defaults() -> dict:
        return ask_defaults()

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return _file_response(STATIC_DIR / "favicon.svg")
