"""WebSocket ``/v1/realtime``: the OpenAI Realtime transcription protocol, plus ``rawcast.*``.

A thin asyncio layer over the I/O-free ``RealtimeProtocol`` (realtime_protocol.py):
a reader task parses client frames and runs the session commands (G.711 and image
decoding in a worker thread, so the loop only moves bytes), a pump task turns
engine events into server events, and a writer task is the only one that sends.

Protocol (what the official ``openai`` SDK speaks, see docs/openai-realtime.md):

- Connect to ``/v1/realtime`` (any query: ``intent``, ``model`` and unknown
  parameters are ignored). The first server event is ``session.created`` with the
  full effective config (``session.type`` ``"transcription"``; input format
  ``{"type": "audio/pcm", "rate": 24000}``; ``turn_detection`` server_vad, or null
  when the server runs without VAD). ``session.update`` merges a partial session
  (``session.type`` is required) and answers ``session.updated`` with the result.
- Formats: ``audio/pcm`` (PCM16 LE mono) at 24000 Hz, and at 16000 or 48000 Hz as
  an extension (``rate`` is echoed as configured; the SDK's strict models only
  know 24000); ``audio/pcmu`` / ``audio/pcma`` (G.711, 8 kHz). Anything else is
  ``unsupported_audio_format``.
- ``turn_detection``: ``server_vad`` maps ``threshold`` and ``silence_duration_ms``
  onto rawcast's VAD (``prefix_padding_ms`` is echoed; the pre-roll is fixed at
  300 ms); ``semantic_vad`` is served as server_vad with the defaults; ``null`` means
  segments end on ``input_audio_buffer.commit`` only. ``noise_reduction``,
  ``transcription.language`` / ``prompt`` are accepted and echoed but not used.
- ``input_audio_buffer.commit`` needs 100 ms of audio since the last commit or
  clear (else ``input_audio_buffer_commit_empty``); each accepted commit yields one
  ``committed`` item. Without VAD it pads the last partial 40 ms frame with silence;
  in server_vad mode it ends the current segment (appending 40 ms of silence so that
  one always exists). ``clear`` answers ``cleared``.
- Server events: ``speech_started`` / ``speech_stopped`` (server_vad only),
  ``committed``, transcription ``delta`` (live partials, possibly before the item
  is committed; ``completed.transcript`` is authoritative) and ``completed`` with
  ``usage {"type": "duration"}``, ``failed`` for a committed item whose audio was
  cleared, and ``error``. Times are ms on the stream's 16 kHz sample clock. Every
  event has a unique ``event_id``; one item per speech segment.

Extensions (names under ``rawcast.``; the SDK passes them through):

- ``session.update`` accepts ``session.rawcast = {"translate": "Spanish" | null,
  "captions": true | false}``; ``session.created`` / ``updated`` echo it.
- ``rawcast.translation.delta`` {item_id, delta, language} and
  ``rawcast.translation.completed`` {item_id, text, language, start_ms, end_ms}.
- ``rawcast.input_image.append`` {image: base64 JPEG or PNG, time_ms (optional,
  default: the audio sent so far)}; with captions on, a frame every 2 s of media
  time is described: ``rawcast.caption.completed`` {item_id, text, start_ms, end_ms}.
- ``completed`` carries ``rawcast: {start_ms, end_ms}`` (an extra field).
- ``rawcast.session.close``: finish the open segment and every pending decode, send
  the remaining events, then ``rawcast.session.closed`` and close with 1000.

Server shutdown: uvicorn closes open WebSockets with 1012 before the app's lifespan
drain runs, so a WebSocket client should commit (or send ``rawcast.session.close``)
before it relies on final events.

A client that stops reading while the server has events for it (its socket full, over
2048 events unsent) is disconnected with 1008 ``client not reading events`` and its
session ends: deltas cannot be dropped, since a client rebuilds the text from them.

Errors: bad client events get an ``error`` event (codes ``invalid_json``,
``unknown_event_type``, ``missing_required_parameter``, ``invalid_type``,
``invalid_value``, ``invalid_base64``, ``invalid_audio_length``, ``invalid_audio``,
``invalid_image``, ``unsupported_audio_format``, ``captions_not_enabled``,
``input_audio_buffer_commit_empty``) and the session goes on. A frame over
``max_message_bytes`` closes with 1009. A wrong API key or origin is refused at the
upgrade with HTTP 401 / 403 and a JSON body (1008 close where the server cannot
send HTTP responses). No free session slot, a per-key quota or draining: an
``error`` (``session_limit_reached`` / ``server_draining``), then close 1013.
Server tuning (``ServerSettings.extra``): ``realtime.decode_interval_ms``,
``realtime.max_new_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import structlog
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from rawcast.pipeline.engine import SessionHandle, SessionLimitError
from rawcast.pipeline.media import ClosedEvent
from rawcast.pipeline.session import SessionConfig, Tasks
from rawcast.transports.app import AppState
from rawcast.transports.realtime_protocol import (
    Clear,
    Commit,
    Configure,
    Finish,
    Limits,
    Output,
    PushG711,
    PushImage,
    PushPcm16,
    RealtimeProtocol,
    Send,
    SetVad,
    decode_g711,
    decode_image,
    error_event,
)
from rawcast.transports.security import AccessDenied

log = structlog.get_logger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_ERROR = 1011
CLOSE_TRY_AGAIN = 1013
PUMP_GRACE_S = 30.0
MAX_UNSENT_EVENTS = 2048  # server events a client may leave unread before it is cut off


def routes() -> list[BaseRoute]:
    return [WebSocketRoute("/v1/realtime", realtime_endpoint)]


def session_config(st: AppState, protocol: RealtimeProtocol) -> SessionConfig:
    extra = st.settings.extra
    assert st.engine is not None
    return SessionConfig(
        tasks=Tasks(),
        decode_interval_ms=int(extra.get("realtime.decode_interval_ms", 480)),
        max_new_tokens=int(extra.get("realtime.max_new_tokens", 48)),
        max_segment_s=min(30.0, st.engine.core.config.max_segment_s),
        vad=protocol.vad_config(),
        preroll_ms=300,
    )


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    code = "invalid_api_key" if status == 401 else "origin_not_allowed"
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
        await ws.send_denial_response(JSONResponse(body, status_code=status))
    else:
        await ws.close(CLOSE_POLICY, reason=message[:120])


async def realtime_endpoint(ws: WebSocket) -> None:
    st: AppState = ws.app.state.rawcast
    try:
        key = st.authorize(dict(ws.headers), dict(ws.query_params))
    except AccessDenied as e:
        log.info("realtime.refused", status=e.status, reason=e.message)
        await _deny(ws, e.status, e.message)
        return
    await ws.accept()
    engine = st.engine
    protocol = RealtimeProtocol(Limits(vad_available=bool(engine and engine.core.vad_model)))
    try:
        if engine is None:
            raise SessionLimitError("the server is still loading its model; try again later")
        st.admit(key)
        handle = await engine.open_session(session_config(st, protocol), protocol.session_id)
    except (AccessDenied, SessionLimitError) as e:
        message = e.message if isinstance(e, AccessDenied) else str(e)
        code = "server_draining" if st.draining else "session_limit_reached"
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps(error_event(code, message, kind="server_error")))
            await ws.close(CLOSE_TRY_AGAIN, reason=message[:120])
        return
    except Exception as e:  # a server misconfiguration: tell the client, keep serving others
        log.exception("realtime.open_failed")
        with contextlib.suppress(Exception):
            msg = f"cannot open a session: {e}"
            await ws.send_text(json.dumps(error_event("server_error", msg, kind="server_error")))
            await ws.close(CLOSE_ERROR, reason="cannot open a session")
        return
    st.track(key, handle)
    t0 = time.monotonic()
    reason = "error"
    with structlog.contextvars.bound_contextvars(session_id=handle.id):
        try:
            reason = await Connection(ws, handle, protocol, st.settings.max_message_bytes).run()
        finally:
            if not handle.closed:
                handle.close(graceful=False)
            st.untrack(key, handle)
            log.info(
                "realtime.summary",
                reason=reason,
                seconds=round(time.monotonic() - t0, 3),
                events_in=protocol.events_in,
                events_out=protocol.events_out,
                errors=protocol.errors,
            )


class Connection:
    """The three tasks of one WebSocket session around its ``RealtimeProtocol``."""

    def __init__(
        self, ws: WebSocket, handle: SessionHandle, protocol: RealtimeProtocol, max_bytes: int
    ) -> None:
        self.ws = ws
        self.handle = handle
        self.protocol = protocol
        self.max_bytes = max_bytes
        # Bounded by ``_put``: deltas cannot be dropped (a client rebuilds the text from
        # them), so a client that stops reading is disconnected instead of growing memory.
        self.out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.max_unsent = MAX_UNSENT_EVENTS
        self.closed_reason = "closed"
        self.close_code: int | None = None  # set by the reader when it ends the connection
        self.socket_ok = True
        self.stalled = False
        self.writer: asyncio.Task[None] | None = None

    async def run(self) -> str:
        """Serve the connection until the client leaves or the session ends; the reason."""
        self._emit(self.protocol.start())
        reader = asyncio.create_task(self._reader())
        pump = asyncio.create_task(self._pump())
        writer = self.writer = asyncio.create_task(self._writer())
        try:
            return await self._serve(reader, pump, writer)
        finally:  # cancelled by a server shutdown: leave no task behind
            for t in (reader, pump, writer):
                t.cancel()

    async def _serve(
        self, reader: asyncio.Task[None], pump: asyncio.Task[None], writer: asyncio.Task[None]
    ) -> str:
        done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if self.stalled:  # the writer was cut off: the client stopped reading its events
            reader.cancel()  # run() cancels whatever is left after the grace
            await asyncio.wait({reader, pump}, timeout=PUMP_GRACE_S)
            await self._close(CLOSE_POLICY, "client not reading events")
            return "stalled"
        if reader in done:  # the client left, or sent something that ends the connection
            if reader.exception() is not None:
                log.error("realtime.reader_failed", error=repr(reader.exception()))
            if not self.handle.closed:
                self.handle.close(graceful=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pump), PUMP_GRACE_S)
            self.out.put_nowait(None)
            await asyncio.wait({writer})  # ends, or was cut off (cancelled) by a stall
            if self.close_code is not None:
                await self._close(self.close_code, "message too big")
            return "client"
        # The engine closed the session (client's rawcast.session.close, an error, draining).
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await pump
        if self.closed_reason == "closed" and self.protocol.closing:
            await self._close(CLOSE_NORMAL, "session closed")
        elif self.closed_reason == "error":
            await self._close(CLOSE_ERROR, "session failed")
        else:
            await self._close(CLOSE_GOING_AWAY, "server closed the session")
        return self.closed_reason

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason=reason), PUMP_GRACE_S)

    def _put(self, event: dict[str, Any]) -> None:
        """Queue one server event for the writer; past ``max_unsent`` end the connection."""
        if self.stalled:
            return
        if self.out.qsize() >= self.max_unsent:
            self._stall()
            return
        self.out.put_nowait(event)

    def _stall(self) -> None:
        self.stalled = True
        log.warning("realtime.client_stalled", unsent=self.out.qsize())
        self.handle.engine.core.observer.error("client_stalled")
        if not self.handle.closed:
            self.handle.close(graceful=False)
        if self.writer is not None:
            self.writer.cancel()

    def _emit(self, outputs: list[Output]) -> None:
        for o in outputs:
            if isinstance(o, Send):
                self._put(o.event)

    async def _reader(self) -> None:
        while not self.stalled:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            data: str | bytes = msg.get("text") or msg.get("bytes") or b""
            size = len(data.encode() if isinstance(data, str) else data)
            if size > self.max_bytes:
                err = error_event(
                    "message_too_large",
                    f"message of {size} bytes exceeds the limit of {self.max_bytes}",
                )
                self._put(err)
                self.close_code = CLOSE_TOO_BIG
                return
            for o in self.protocol.receive(data):
                await self._run(o)

    async def _run(self, o: Output) -> None:
        h = self.handle
        if h.closed:
            if isinstance(o, Send):
                self._put(o.event)
            return
        try:
            if isinstance(o, Send):
                self._put(o.event)
            elif isinstance(o, PushPcm16):
                h.push_audio(o.pcm, o.rate)
            elif isinstance(o, PushG711):
                h.push_audio(await asyncio.to_thread(decode_g711, o.data, o.codec), 8000)
            elif isinstance(o, PushImage):
                h.push_image(await asyncio.to_thread(decode_image, o.data), o.time_s)
            elif isinstance(o, SetVad):
                h.set_vad(o.config)
            elif isinstance(o, Configure):
                h.configure(o.tasks)
            elif isinstance(o, Commit):
                h.flush() if o.pad else h.commit()
            elif isinstance(o, Clear):
                h.clear()
            elif isinstance(o, Finish):
                h.close(graceful=True)
        except ValueError as e:  # undecodable image or G.711 payload
            self._emit(self.protocol.command_failed(o, e))
        except RuntimeError:  # the engine closed the session meanwhile
            return

    async def _pump(self) -> None:
        async for ev in self.handle.events():
            if isinstance(ev, ClosedEvent):
                self.closed_reason = ev.reason
            self._emit(self.protocol.engine_event(ev))
        if not self.stalled:  # a stalled writer is gone; it needs no end marker
            self.out.put_nowait(None)

    async def _writer(self) -> None:
        while (event := await self.out.get()) is not None:
            if not self.socket_ok:
                continue
            try:
                await self.ws.send_text(json.dumps(event))
            except Exception:  # the client is gone: keep draining, send nothing more
                self.socket_ok = False
