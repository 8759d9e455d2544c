"""The ``rawcast`` command line. The only place that reads argv and the environment.

Each command lives in its own module with ``register(subparsers)``, which adds a
subparser and sets ``func`` (args -> exit code); this file only collects them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import structlog

from rawcast.pipeline.logs import configure_logging
from rawcast.transports.runtime import RuntimeLoadError, add_model_args, check_drafter, options

log = structlog.get_logger(__name__)

# Modules that add commands; a module that is missing from this build is skipped.
COMMAND_MODULES = (
    "rawcast.transports.cli",
    "rawcast.transports.stream",
    "rawcast.transports.transcribe",
    "rawcast.transports.narrate",
    "rawcast.transports.export",
    "rawcast.model.recipe.commands",
)


def _version() -> str:
    try:
        return version("rawcast")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def _env_list(name: str) -> list[str]:
    return [x for x in os.environ.get(name, "").split(",") if x]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the HTTP/WebSocket/WebRTC server")
    serve.add_argument("--host", default=os.environ.get("RAWCAST_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=os.environ.get("RAWCAST_PORT", "8000"))
    add_model_args(serve)
    serve.add_argument(
        "--max-sessions", type=int, default=os.environ.get("RAWCAST_MAX_SESSIONS", "8"),
        help="concurrent sessions (env RAWCAST_MAX_SESSIONS)",
    )  # fmt: skip
    serve.add_argument(
        "--api-key", action="append", default=_env_list("RAWCAST_API_KEYS"),
        help="accepted Bearer key (repeatable; env RAWCAST_API_KEYS, comma-separated)",
    )  # fmt: skip
    serve.add_argument(
        "--allowed-origin", action="append", default=_env_list("RAWCAST_ALLOWED_ORIGINS"),
        help="browser origin allowed besides same-origin (repeatable; '*' allows any)",
    )  # fmt: skip
    serve.add_argument(
        "--ice-server", action="append", default=_env_list("RAWCAST_ICE_SERVERS"),
        help="stun:/turn: URL advertised to WebRTC clients (repeatable)",
    )  # fmt: skip
    serve.add_argument("--turn-username", default=os.environ.get("RAWCAST_TURN_USERNAME"))
    serve.add_argument("--turn-credential", default=os.environ.get("RAWCAST_TURN_CREDENTIAL"))
    serve.add_argument(
        "--turn-secret", default=os.environ.get("RAWCAST_TURN_SECRET"),
        help="the TURN server's shared secret (coturn use-auth-secret): each client gets "
        "credentials of its own that expire after --turn-ttl, instead of --turn-credential "
        "(env RAWCAST_TURN_SECRET)",
    )  # fmt: skip
    serve.add_argument(
        "--turn-ttl", type=int, default=os.environ.get("RAWCAST_TURN_TTL", "86400"),
        help="seconds minted TURN credentials stay valid (env RAWCAST_TURN_TTL)",
    )  # fmt: skip
    serve.add_argument(
        "--max-sessions-per-key", type=int,
        default=os.environ.get("RAWCAST_MAX_SESSIONS_PER_KEY", "0"),
        help="sessions one API key may hold; 0: no limit (env RAWCAST_MAX_SESSIONS_PER_KEY)",
    )  # fmt: skip
    serve.add_argument(
        "--drain-timeout", type=float,
        default=os.environ.get("RAWCAST_DRAIN_TIMEOUT", "30"),
        help="seconds open sessions get to finish on SIGTERM (env RAWCAST_DRAIN_TIMEOUT)",
    )  # fmt: skip
    serve.add_argument(
        "--no-vad", action="store_true", default=os.environ.get("RAWCAST_VAD", "1") == "0",
        help="segment on commit only (env RAWCAST_VAD=0)",
    )  # fmt: skip
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from rawcast.transports.server import run_server
    from rawcast.transports.settings import ServerSettings

    settings = ServerSettings(
        host=args.host, port=args.port, model=args.model, device=args.device, dtype=args.dtype,
        backend=args.backend, onnx_dir=args.onnx_dir, threads=args.threads,
        max_sessions=args.max_sessions, api_keys=tuple(args.api_key),
        allowed_origins=tuple(args.allowed_origin), ice_servers=tuple(args.ice_server),
        turn_username=args.turn_username, turn_credential=args.turn_credential,
        turn_secret=args.turn_secret, turn_ttl_s=args.turn_ttl,
        max_sessions_per_key=args.max_sessions_per_key, drain_timeout_s=args.drain_timeout,
        vad=not args.no_vad, drafter=args.drafter, compile=args.compile,
    )  # fmt: skip
    from rawcast.model.loader import CheckpointError, resolve

    try:
        resolve(settings.model)
    except CheckpointError as e:
        print(f"rawcast serve: {e}", file=sys.stderr)
        return 2
    if settings.turn_secret is not None and settings.turn_credential is not None:
        print("rawcast serve: give --turn-secret or --turn-credential, not both", file=sys.stderr)
        return 2
    if settings.turn_ttl_s <= 0:
        print("rawcast serve: --turn-ttl must be a number of seconds above 0", file=sys.stderr)
        return 2
    if settings.backend == "onnx" and settings.dtype != "fp32":
        print("rawcast serve: --backend onnx runs fp32 graphs: use --dtype fp32", file=sys.stderr)
        return 2
    try:
        check_drafter(options(args))
    except RuntimeLoadError as e:
        print(f"rawcast serve: {e}", file=sys.stderr)
        return 2
    run_server(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rawcast",
        description="Streaming transcription, translation and scene captions "
        "on one encoder-free Gemma 4 Unified backbone.",
    )
    parser.add_argument("--version", action="version", version=f"rawcast {_version()}")
    parser.add_argument(
        "--log-level", default=None, choices=["debug", "info", "warning", "error"],
        help="default: info (warning for transcribe, eval and export-onnx)",
    )  # fmt: skip
    parser.add_argument("--log-format", default="auto", choices=["auto", "console", "json"])
    parser.set_defaults(default_log_level="info")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        reg = getattr(mod, "register", None)
        if reg is not None:
            reg(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(args.log_level or args.default_log_level, args.log_format)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
