"""`dtl serve`: the OpenAI-compatible HTTP API (and the web page) for one model."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from dtl.errors import DtlError


def register(subparsers) -> None:
    from dtl.cli import add_common
    from dtl.cli.generate import _model_args

    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API and a web page",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve POST /v1/completions, POST /v1/chat/completions (both with "
        "stream: true and logprobs), GET /v1/models, GET /health and the tokenizer (POST "
        "/tokenize, /detokenize, GET /tokenizer_info: what lm-evaluation-harness's "
        "local-completions reads), plus the web page at /. Binds to loopback unless --host "
        "says otherwise.",
        epilog="examples:\n"
        "  dtl serve --model runs/qa\n"
        "  dtl serve --model runs/qa --host 0.0.0.0 --port 8080 --api-key s3cret\n"
        "  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
        '       -d \'{"prompt": "The history of", "max_tokens": 20}\'',
    )
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("DTL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the API (default: $DTL_API_KEY, else none)",
    )
    p.add_argument("--name", help="the model id clients use (default: the model dir's name)")
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for the model (default: all cores but one, which the HTTP side "
        "needs: on 2 cores one stream ran 160 -> 210 tok/s)",
    )
    add_common(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import uvicorn

    from dtl.cli.generate import _load
    from dtl.device import resolve_device
    from dtl.model.store import model_name
    from dtl.serve.api import create_app

    if not 0 < args.port < 65536:
        raise DtlError(f"--port {args.port}: must be between 1 and 65535")
    device = resolve_device(args.device)  # before the slow load
    threads = serve_threads(args.threads, os.cpu_count() or 1)
    _check_port_free(args.host, args.port)
    import torch

    torch.set_num_threads(threads)
    model, tokenizer = _load(args, device)
    name = args.name or model_name(args.model)
    app = create_app(model, tokenizer, name, api_key=args.api_key)
    where = f"http://{args.host}:{args.port}"
    auth = " (API key required)" if args.api_key else ""
    print(f"dtl serve: {name} ({model.num_parameters():,} parameters) at {where}/ "
          f"and {where}/v1{auth}; Ctrl-C stops", flush=True)  # fmt: skip
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"dtl serve: warning: listening on {args.host} without --api-key; anyone who can "
              "reach this port can use the model", file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def serve_threads(asked: int | None, cores: int) -> int:
    """Intra-op threads for serving: as asked, else every core but one. The event loop
    serving the HTTP side needs a core; when it shares all of them with the model's thread
    pool, the pool's threads wait on the one it preempted (docs/benchmarks.md)."""
    if asked is None:
        return max(1, cores - 1)
    if asked < 1:
        raise DtlError(f"--threads {asked}: give at least 1 (default: all cores but one)")
    return asked


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear line (before loading the model) if the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise DtlError(f"--host {host}: cannot resolve this address ({err})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise DtlError(
                f"cannot listen on {host}:{port} ({err.strerror}); is another server running "
                "there? pick another --port"
            ) from None
