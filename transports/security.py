"""API keys (Bearer) and browser origins, shared by every endpoint."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from rawcast.transports.settings import ServerSettings


class AccessDenied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def api_key(settings: ServerSettings, headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The caller's key ('' when auth is off); raises AccessDenied(401) when it is wrong.

    Browsers cannot set headers on a WebSocket, so ``?api_key=`` is accepted as well.
    """
    if not settings.api_keys:
        return ""
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else query.get("api_key", "")
    if not key:
        raise AccessDenied(401, "missing API key: send 'Authorization: Bearer <key>'")
    if key not in settings.api_keys:
        raise AccessDenied(401, "invalid API key")
    return key


def check_origin(settings: ServerSettings, headers: Mapping[str, str]) -> None:
    """Allow requests without Origin (non-browsers), same-origin, and listed origins."""
    origin = headers.get("origin")
    if origin is None or "*" in settings.allowed_origins or origin in settings.allowed_origins:
        return
    host = headers.get("host", "")
    if urlsplit(origin).netloc == host:
        return
    raise AccessDenied(403, f"origin {origin} is not allowed (see --allowed-origin)")
