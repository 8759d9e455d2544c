"""Named event feeds: ``rawcast narrate --publish`` posts, WebSocket clients listen.

- ``POST /v1/feeds/{name}`` with a JSON object (at most 64 KiB): delivered to every
  client of that feed; 202 with the number of listeners.
- ``WS /v1/feeds/{name}``: each published object as one text message, in order.

Both need the API key when the server has keys. Feeds keep no history and cost nothing
when nobody listens. Each listener has a bounded queue: a client too slow to read loses
the oldest events, and gets a ``rawcast.feed.dropped`` message saying how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import defaultdict
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from rawcast.transports.security import AccessDenied

log = structlog.get_logger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_BODY = 64 * 1024
QUEUE = 256


class Listener:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE)
        self.dropped = 0

    def offer(self, text: str) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(text)


class Feeds:
    """The listeners of each feed (event-loop state only)."""

    def __init__(self) -> None:
        self.listeners: dict[str, set[Listener]] = defaultdict(set)

    def publish(self, name: str, event: dict[str, Any]) -> int:
        text = json.dumps(event, ensure_ascii=False)
        got = self.listeners.get(name, set())
        for li in got:
            li.offer(text)
        return len(got)


def _feeds(app: Any) -> Feeds:
    st = app.state
    if not hasattr(st, "rawcast_feeds"):
        st.rawcast_feeds = Feeds()
    feeds: Feeds = st.rawcast_feeds
    return feeds


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": "invalid_request_error", "message": message}}, status)


async def publish(request: Request) -> JSONResponse:
    st = request.app.state.rawcast
    try:
        st.authorize(dict(request.headers), dict(request.query_params))
    except AccessDenied as e:
        return _error(e.status, e.message)
    name = request.path_params["name"]
    if not NAME.match(name):
        return _error(400, "feed names are 1-64 letters, digits, '_', '-' or '.'")
    body = await request.body()
    if len(body) > MAX_BODY:
        return _error(413, f"an event is at most {MAX_BODY} bytes")
    try:
        event = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return _error(400, f"the body must be a JSON object: {e}")
    if not isinstance(event, dict):
        return _error(400, "the body must be a JSON object")
    n = _feeds(request.app).publish(name, event)
    return JSONResponse({"feed": name, "listeners": n}, status_code=202)


async def listen(ws: WebSocket) -> None:
    st = ws.app.state.rawcast
    name = ws.path_params["name"]
    try:
        st.authorize(dict(ws.headers), dict(ws.query_params))
    except AccessDenied as e:
        await ws.close(1008, reason=e.message[:120])
        return
    if not NAME.match(name):
        await ws.close(1008, reason="bad feed name")
        return
    await ws.accept()
    feeds = _feeds(ws.app)
    me = Listener()
    feeds.listeners[name].add(me)
    reader = asyncio.create_task(_drain_client(ws))
    try:
        reported = 0
        while not reader.done():
            getter = asyncio.create_task(me.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            if me.dropped > reported:
                lost = me.dropped - reported
                reported = me.dropped
                await ws.send_text(json.dumps({"type": "rawcast.feed.dropped", "events": lost}))
            await ws.send_text(getter.result())
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        feeds.listeners[name].discard(me)
        if not feeds.listeners[name]:
            del feeds.listeners[name]


async def _drain_client(ws: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it goes away."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/feeds/{name}", publish, methods=["POST"]),
        WebSocketRoute("/v1/feeds/{name}", listen),
    ]
