"""`dtl serve`: the OpenAI-compatible HTTP API (and the web page) for one model."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from dtl.errors import DtlError


def register(subparsers) -> None:
    from dtl.cli import add_common, add_model_args

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
        "  dtl serve --model runs/qa --host 0.0.0.0 --allowed-hosts gpu-box.lan --api-key s3cret\n"
        "  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
        '       -d \'{"prompt": "The history of", "max_tokens": 20}\'',
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on everything but the page's files and "
        "/health (default: $DTL_API_KEY, else none)",
    )
    p.add_argument(
        "--allowed-hosts",
        default="",
        metavar="NAMES",
        help="comma-separated host names clients may reach this server by, besides localhost "
        "and IP addresses (which always work); '*' allows any (turns off the DNS-rebinding "
        "check). The --host name is allowed too",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        metavar="MB",
        help="largest request body, in MiB (default 4; larger ones get 413)",
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

    from dtl.cli import load_model_args
    from dtl.device import resolve_device
    from dtl.model.dtype import resolve_inference_dtype
    from dtl.model.store import model_name
    from dtl.serve.api import create_app

    if not 0 < args.port < 65536:
        raise DtlError(f"--port {args.port}: must be between 1 and 65535")
    api_key = api_key_setting(args.api_key, os.environ.get("DTL_API_KEY"))
    max_body = max_body_bytes(args.max_body_mb)
    allowed = allowed_hosts(args.allowed_hosts, args.host)
    device = resolve_device(args.device)  # before the slow load
    resolve_inference_dtype(args.dtype, device)  # a bad --dtype too
    threads = serve_threads(args.threads, os.cpu_count() or 1)
    _check_port_free(args.host, args.port)
    import torch

    torch.set_num_threads(threads)
    model, tokenizer = load_model_args(args, device)
    name = args.name or model_name(args.model)
    app = create_app(model, tokenizer, name, api_key=api_key, allowed_hosts=allowed,
                     max_body_bytes=max_body)  # fmt: skip
    where = f"http://{args.host}:{args.port}"
    auth = " (API key required)" if api_key else ""
    print(f"dtl serve: {name} ({model.num_parameters():,} parameters, {args.dtype_used}) at "
          f"{where}/ and {where}/v1{auth}; Ctrl-C stops", flush=True)  # fmt: skip
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"dtl serve: warning: listening on {args.host} without --api-key; anyone who can "
              "reach this port can use the model", file=sys.stderr, flush=True)  # fmt: skip
    if args.host in ("0.0.0.0", "::") and not args.allowed_hosts:
        print("dtl serve: clients reach it by IP address or localhost; to use a host name, add "
              "--allowed-hosts NAME (DNS-rebinding guard)", file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def api_key_setting(flag: str | None, env: str | None) -> str | None:
    """The key to require: --api-key, else $DTL_API_KEY, else None (no key). An empty or
    blank one is an error, never a silent server without authentication."""
    key, where = (flag, "--api-key") if flag is not None else (env, "DTL_API_KEY")
    if key is None:
        return None
    if not key.strip():
        raise DtlError(f"{where} is empty: give a key, or leave out --api-key and unset "
                       "DTL_API_KEY to serve without one")  # fmt: skip
    if key != key.strip() or not key.isascii() or not key.isprintable():
        raise DtlError(f"{where}: the key must be printable ASCII without leading or trailing "
                       "spaces (clients send it in an HTTP header)")  # fmt: skip
    return key


def allowed_hosts(names: str, host: str) -> list[str]:
    """--allowed-hosts as a list, plus the --host name when it is a name (not an address)."""
    allowed = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in allowed if "/" in n or ":" in n]  # IP addresses need no entry
    if bad:
        raise DtlError(f"--allowed-hosts {bad[0]!r}: give host names such as gpu-box.lan, "
                       "without scheme or port")  # fmt: skip
    return [*allowed, host]


def max_body_bytes(mib: float | None) -> int:
    """--max-body-mb in bytes (default `dtl.serve.guard.DEFAULT_MAX_BODY_BYTES`, 4 MiB)."""
    from dtl.serve.guard import DEFAULT_MAX_BODY_BYTES

    if mib is None:
        return DEFAULT_MAX_BODY_BYTES
    if not 0.001 <= mib <= 1024:  # also refuses nan
        raise DtlError(f"--max-body-mb {mib:g}: give a size from 0.001 to 1024 MiB")
    return int(mib * (1 << 20))


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
