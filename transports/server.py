"""The HTTP server: one ASGI app on one port.

For now it serves health and readiness only; the realtime WebSocket, WebRTC and
browser page mount here as the transports land.
"""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    ready = bool(getattr(request.app.state, "ready", True))
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def create_app() -> Starlette:
    app = Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz)])
    app.state.ready = True
    return app


def run_server(host: str, port: int) -> None:
    uvicorn.run(create_app(), host=host, port=port, ws="websockets", log_config=None)
