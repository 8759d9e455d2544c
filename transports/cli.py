"""The ``rawcast`` command line. The only place that reads argv and the environment."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import structlog

from rawcast.pipeline.logs import configure_logging

log = structlog.get_logger(__name__)


def _version() -> str:
    try:
        return version("rawcast")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rawcast",
        description="Streaming transcription, translation and scene captions "
        "on one encoder-free Gemma 4 Unified backbone.",
    )
    parser.add_argument("--version", action="version", version=f"rawcast {_version()}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="auto", choices=["auto", "console", "json"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP/WebSocket/WebRTC server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from rawcast.transports.server import run_server

    run_server(host=args.host, port=args.port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    handlers = {"serve": _serve}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
