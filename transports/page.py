"""The browser page (``GET /``) and the small JSON config it reads (``GET /v1/config``).

Design decisions:

- Plain HTML, JS and CSS with no build step, shipped as package data under
  ``static/`` and read with ``importlib.resources``: an installed wheel serves the
  same files as a source tree. Only the listed files are served, with their
  content types; nothing is resolved from the request path.
- The page talks to ``POST /v1/realtime/calls`` (multipart: ``sdp`` + ``session``)
  and reads events on the ``oai-events`` data channel; it needs no server state of
  its own. ``/v1/config`` gives it the ICE servers (TURN credentials included), so
  it is behind the API key like the other ``/v1`` endpoints.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rawcast.transports.app import state
from rawcast.transports.security import AccessDenied
from rawcast.transports.webrtc import ice_servers

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
LANGUAGES = ("Spanish", "French", "German", "Italian", "Portuguese", "Japanese", "Chinese")
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Permissions-Policy": "camera=(self), microphone=(self)",
}


def _read(name: str) -> bytes:
    return resources.files("rawcast.transports").joinpath("static", name).read_bytes()


async def index(request: Request) -> Response:
    return Response(_read("index.html"), media_type=STATIC["index.html"], headers=HEADERS)


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return JSONResponse({"error": {"message": f"no such file: {name}"}}, status_code=404)
    return Response(_read(name), media_type=STATIC[name], headers=HEADERS)


async def config(request: Request) -> JSONResponse:
    """What the page needs before connecting: ICE servers, endpoints, languages."""
    st = state(request)
    try:
        st.authorize(dict(request.headers), dict(request.query_params))
    except AccessDenied as e:
        body = {"error": {"message": e.message}, "auth_required": bool(st.settings.api_keys)}
        return JSONResponse(body, status_code=e.status)
    return JSONResponse(
        {
            "ice_servers": ice_servers(st.settings),
            "auth_required": bool(st.settings.api_keys),
            "calls_url": "/v1/realtime/calls",
            "whip_url": "/v1/whip",
            "languages": list(LANGUAGES),
            "default_language": LANGUAGES[0],
        },
        headers={"Cache-Control": "no-store"},
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/static/{name}", static, methods=["GET", "HEAD"]),
        Route("/v1/config", config, methods=["GET"]),
    ]
