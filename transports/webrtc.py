"""WebRTC ingest on aiortc: WHIP (RFC 9725) and OpenAI's ``POST /v1/realtime/calls``.

Design decisions:

- One ``Call`` per peer connection holds everything of that connection (peer
  connection, engine session handle, reader tasks, data channel); calls are kept
  in a ``Calls`` registry on ``app.state``, never in module globals.
- The offer is checked before anything is allocated, so each bad input gets a 4xx
  with a one-line message: not SDP (400), wrong content type (415), no audio, audio
  not sent, or no codec the server decodes (422); access is checked by the app's
  ``AppState`` (401, 403, 429, 503 while draining), and a full engine is 503 with
  ``Retry-After``.
- aiortc gathers its candidates before answering, so the answer is complete;
  trickled client candidates (``PATCH`` with ``application/trickle-ice-sdpfrag``)
  are added to the ICE agent; an ICE restart is refused.
- The loop does I/O only: aiortc's PyAV frames go to ``SessionHandle.push_audio`` /
  ``push_image`` as they are, and the engine worker resamples, frames and patches.
  Audio is never dropped here. Video is: a frame is forwarded only if at least
  ``VIDEO_MIN_INTERVAL_S`` passed since the last forwarded one (the session's
  ``FrameSampler`` keeps one every caption interval anyway), and drops are counted.
- Video time: the audio clock starts at sample 0 with the first media frame; a
  video frame's time is its pts relative to the first video frame, plus the
  arrival offset of that first video frame.
- The data channel speaks the WebSocket protocol: the same I/O-free
  ``RealtimeProtocol`` core (realtime_protocol.py) makes the events
  (session.created, speech_started/stopped, committed, transcription delta and
  completed, ``rawcast.translation.*``, ``rawcast.caption.completed``, error) and
  reads client events (``session.update`` with ``session.rawcast``,
  ``input_audio_buffer.commit`` / ``clear``, ``rawcast.session.close``); media
  come as tracks only. The channel is ``oai-events``: the client's if it opened
  one, else the server opens it once connected (when the offer has a data-channel
  section). Events wait in a bounded buffer until the channel is open.
- Initial settings: the ``session`` part of a multipart offer, then the query
  (``?translate=Spanish&captions=1``), applied as one ``session.update``.
- A call ends on ``DELETE`` (or ``/hangup``), on a failed or closed peer
  connection, or when its engine session closes (error, server drain); ending
  closes the peer connection, cancels the readers and frees the engine slot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import structlog
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc import sdp as aiosdp
from aiortc.mediastreams import MediaStreamError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rawcast.pipeline.engine import SessionHandle, SessionLimitError
from rawcast.pipeline.media import ClosedEvent
from rawcast.transports.app import AppState, state
from rawcast.transports.realtime import session_config
from rawcast.transports.realtime_protocol import (
    Clear,
    Commit,
    Configure,
    Finish,
    Limits,
    Output,
    PushPcm16,
    RealtimeProtocol,
    Send,
    SetVad,
)
from rawcast.transports.security import AccessDenied, check_origin
from rawcast.transports.settings import ServerSettings

log = structlog.get_logger(__name__)

EVENTS_LABEL = "oai-events"
AUDIO_CODECS = ("opus", "pcmu", "pcma", "g722")  # what aiortc decodes
VIDEO_CODECS = ("vp8", "h264")
VIDEO_MIN_INTERVAL_S = 0.25
MAX_SDP_BYTES = 64 * 1024
MAX_PENDING_EVENTS = 512  # events waiting for the data channel to open
MAX_CHANNEL_BUFFER = 4 * 1024 * 1024  # bytes queued on the channel before events are dropped
CHANNEL_WAIT_S = 0.5  # after connecting, how long to wait for the client's oai-events channel
RETRY_AFTER_S = 5
LANGUAGE = re.compile(r"^[^\W\d_][\w \-()]{0,39}$")


class RequestError(Exception):
    """A client error: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


# --- ICE servers ------------------------------------------------------------------------


def ice_servers(settings: ServerSettings, now: float | None = None) -> list[dict[str, Any]]:
    """The ICE servers as WebRTC ``RTCIceServer`` dicts (credentials on TURN only): with a
    ``turn_secret``, credentials minted for this call (``turn_credentials``), else the
    static username and credential."""
    out: list[dict[str, Any]] = []
    creds: tuple[str, str] | None = None
    if settings.turn_secret is not None:
        name = settings.turn_username or "rawcast"
        creds = turn_credentials(settings.turn_secret, name, settings.turn_ttl_s, now)
    elif settings.turn_username is not None:
        creds = (settings.turn_username, settings.turn_credential or "")
    for url in settings.ice_servers:
        server: dict[str, Any] = {"urls": [url]}
        if url.startswith(("turn:", "turns:")) and creds is not None:
            server["username"], server["credential"] = creds
        out.append(server)
    return out


def turn_credentials(
    secret: str, user: str, ttl_s: int, now: float | None = None
) -> tuple[str, str]:
    """Time-limited TURN credentials of the TURN REST API scheme that coturn checks with
    ``use-auth-secret``: the username is ``<expiry unix time>:<user>``, the password the
    base64 HMAC-SHA1 of the username under the shared secret. The TURN server needs no
    list of users, and a credential copied out of a page stops working at its expiry."""
    expiry = int(time.time() if now is None else now) + ttl_s
    username = f"{expiry}:{user}"
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(mac).decode()


def link_headers(settings: ServerSettings) -> list[str]:
    """RFC 9725 ``Link`` header values advertising the ICE servers."""
    out = []
    for server in ice_servers(settings):
        value = f'<{server["urls"][0]}>; rel="ice-server"'
        if "username" in server:
            value += (
                f'; username="{_quote(server["username"])}"'
                f'; credential="{_quote(server["credential"])}"; credential-type="password"'
            )
        out.append(value)
    return out


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def rtc_configuration(settings: ServerSettings) -> RTCConfiguration:
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in ice_servers(settings)
        ]
    )


# --- the offer and the session options --------------------------------------------------


@dataclass(frozen=True)
class Offer:
    sdp: str
    has_video: bool
    has_data_channel: bool


def check_offer(text: str) -> Offer:
    """Validate an SDP offer before any resource is allocated. Raises RequestError."""
    if not text.lstrip().startswith("v=0"):
        raise RequestError(400, "the body is not an SDP offer (it must start with 'v=0')")
    try:
        desc = aiosdp.SessionDescription.parse(text)
    except Exception as e:  # aiortc's parser raises assorted errors on garbage
        raise RequestError(400, f"the SDP offer could not be parsed: {e}") from e
    audio = [m for m in desc.media if m.kind == "audio"]
    video = [m for m in desc.media if m.kind == "video"]
    if not audio:
        raise RequestError(
            422, "the offer has no audio track: rawcast needs one (Opus, PCMU or PCMA)"
        )
    for m in audio:
        if m.direction not in ("sendrecv", "sendonly", None):
            raise RequestError(422, f"the offer's audio track is {m.direction}: it must send")
    for kind, media, known in (("audio", audio, AUDIO_CODECS), ("video", video, VIDEO_CODECS)):
        for m in media:
            names = sorted({c.mimeType.split("/")[-1].lower() for c in m.rtp.codecs} - {"rtx"})
            if not set(names) & set(known):
                raise RequestError(
                    422,
                    f"no supported {kind} codec in the offer (got {', '.join(names) or 'none'}; "
                    f"rawcast takes {', '.join(known)})",
                    "unsupported_codec",
                )
    for m in desc.media:
        if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
            raise RequestError(400, "the SDP offer has no ICE credentials (ice-ufrag/ice-pwd)")
    return Offer(
        sdp=text,
        has_video=bool(video),
        has_data_channel=any(m.kind == "application" for m in desc.media),
    )


def _flag(value: str, name: str) -> bool:
    s = value.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise RequestError(400, f"{name} must be true or false, got {value!r}")


def _language(value: str) -> str | None:
    s = value.strip()
    if s.lower() in ("", "none", "off", "null"):
        return None
    if not LANGUAGE.match(s):
        raise RequestError(400, f"translate must be a language name such as 'Spanish', got {s!r}")
    return s


def session_update(session: Any, query: Mapping[str, str]) -> dict[str, Any] | None:
    """The initial ``session.update`` event: the offer's session part, then the query's
    ``translate`` and ``captions`` (None when neither says anything)."""
    if session is None and not {"translate", "captions", "caption"} & set(query):
        return None
    if session is None:
        session = {}
    if not isinstance(session, dict):
        raise RequestError(400, "the session part must be a JSON object")
    session = {"type": "transcription", **session}
    extra = session.get("rawcast") or {}
    if not isinstance(extra, dict):
        raise RequestError(400, "session.rawcast must be a JSON object")
    extra = dict(extra)
    if "translate" in query:
        extra["translate"] = _language(query["translate"])
    for name in ("caption", "captions"):
        if name in query:
            extra["captions"] = _flag(query[name], name)
    if extra:
        session["rawcast"] = extra
    return {"type": "session.update", "session": session}


def parse_multipart(content_type: str, body: bytes) -> tuple[str, Any]:
    """The ``sdp`` and ``session`` parts of a ``multipart/form-data`` body."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise RequestError(400, "the multipart body could not be parsed (boundary missing?)")
    parts: dict[str, bytes] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            parts[name] = payload
    if "sdp" not in parts:
        raise RequestError(400, "the multipart body has no 'sdp' part")
    session: Any = None
    if "session" in parts:
        try:
            session = json.loads(parts["session"])
        except ValueError as e:
            raise RequestError(400, f"the 'session' part is not JSON: {e}") from e
    return parts["sdp"].decode("utf-8", "replace"), session


# --- one call ---------------------------------------------------------------------------


class Calls:
    """The open calls of one app (on ``app.state.webrtc``)."""

    def __init__(self) -> None:
        self.calls: dict[str, Call] = {}

    @property
    def peer_connections(self) -> set[RTCPeerConnection]:
        return {c.pc for c in self.calls.values()}


def calls_of(st_owner: Any) -> Calls:
    """The ``Calls`` registry on an app's state (created on first use)."""
    calls = getattr(st_owner.state, "webrtc", None)
    if calls is None:
        calls = st_owner.state.webrtc = Calls()
    assert isinstance(calls, Calls)
    return calls


class Call:
    """One peer connection and its engine session."""

    def __init__(
        self,
        call_id: str,
        st: AppState,
        registry: Calls,
        key: str,
        handle: SessionHandle,
        proto: RealtimeProtocol,
        offer: Offer,
    ) -> None:
        self.id = call_id
        self.st = st
        self.registry = registry
        self.key = key
        self.handle = handle
        self.proto = proto
        self.offer = offer
        self.pc = RTCPeerConnection(rtc_configuration(st.settings))
        self.log = log.bind(session_id=call_id)
        self.channel: Any = None
        self.pending: deque[str] = deque(maxlen=MAX_PENDING_EVENTS)
        self.readers: set[asyncio.Task[None]] = set()
        self.pump: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None
        self.closed = False
        self.pc_closed = asyncio.Event()
        self.opened_at = time.monotonic()
        self._t0: float | None = None  # loop time of the first media frame (audio sample 0)
        self._video0: tuple[Any, float] | None = None  # first video pts, its media time
        self._last_video: float | None = None
        self.audio_frames = 0
        self.video_forwarded = 0
        self.video_dropped = 0
        self.events_sent = 0
        self.events_dropped = 0

    # --- negotiation ---

    async def answer(self) -> str:
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)
        self.registry.calls[self.id] = self
        self._run(self.proto.start())
        self.pump = asyncio.create_task(self._pump(), name=f"webrtc-pump-{self.id}")
        try:
            await pc.setRemoteDescription(RTCSessionDescription(self.offer.sdp, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:
            await self.close("negotiation failed")
            raise RequestError(422, f"the offer could not be negotiated: {e}") from e
        self.log.info(
            "webrtc.answered", tasks=str(self.proto.tasks()), video=self.offer.has_video,
            data_channel=self.offer.has_data_channel,
        )  # fmt: skip
        return str(pc.localDescription.sdp)

    async def add_candidates(self, frag: str) -> None:
        """Trickle ICE: add the candidates of an ``application/trickle-ice-sdpfrag``."""
        remote = self.pc.remoteDescription
        ufrags = set(re.findall(r"^a=ice-ufrag:(\S+)", remote.sdp, re.M)) if remote else set()
        new_ufrag = re.findall(r"^a=ice-ufrag:(\S+)", frag, re.M)
        if new_ufrag and not set(new_ufrag) <= ufrags:
            raise RequestError(405, "ICE restarts are not supported: start a new session")
        mid: str | None = None
        added = 0
        for line in frag.splitlines():
            line = line.strip()
            if line.startswith("a=mid:"):
                mid = line[6:]
            elif line.startswith("a=candidate:"):
                try:
                    cand = aiosdp.candidate_from_sdp(line[12:])
                except Exception as e:  # malformed candidate line
                    raise RequestError(400, f"bad candidate line: {line[:80]}") from e
                cand.sdpMid = mid
                if mid is None:
                    cand.sdpMLineIndex = 0
                await self.pc.addIceCandidate(cand)
                added += 1
            elif line == "a=end-of-candidates":
                await self.pc.addIceCandidate(None)
        self.log.debug("webrtc.trickle", candidates=added)

    # --- media in ---

    def _on_track(self, track: Any) -> None:
        if track.kind == "audio":
            reader = self._read_audio(track)
        elif track.kind == "video":
            reader = self._read_video(track)
        else:
            return
        task = asyncio.create_task(reader, name=f"webrtc-{track.kind}-{self.id}")
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)

    def _mark_t0(self) -> float:
        now = asyncio.get_running_loop().time()
        if self._t0 is None:
            self._t0 = now
        return now

    async def _read_audio(self, track: Any) -> None:
        while not self.handle.closed:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self._mark_t0()
            self.audio_frames += 1
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                self.handle.push_audio(frame)

    async def _read_video(self, track: Any) -> None:
        while not self.handle.closed:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = self._mark_t0()
            if not self.proto.tasks().caption:
                continue
            if self._last_video is not None and now - self._last_video < VIDEO_MIN_INTERVAL_S:
                self.video_dropped += 1
                self.st.metrics.dropped("video", 1)
                continue
            self._last_video = now
            self.video_forwarded += 1
            with contextlib.suppress(RuntimeError):
                self.handle.push_image(frame, self._video_time(frame, now))

    def _video_time(self, frame: Any, now: float) -> float:
        assert self._t0 is not None
        if frame.pts is None or frame.time_base is None:
            return max(0.0, now - self._t0)
        if self._video0 is None:
            self._video0 = (frame.pts, now - self._t0)
        pts0, offset = self._video0
        return max(0.0, float((frame.pts - pts0) * frame.time_base) + offset)

    # --- events out ---

    def _send(self, obj: dict[str, Any]) -> None:
        text = json.dumps(obj)
        ch = self.channel
        if ch is None or ch.readyState != "open":
            if len(self.pending) == self.pending.maxlen:
                self.events_dropped += 1
            self.pending.append(text)
            return
        if ch.bufferedAmount > MAX_CHANNEL_BUFFER:  # the client does not read: drop, counted
            self.events_dropped += 1
            return
        ch.send(text)
        self.events_sent += 1

    def _use_channel(self, ch: Any) -> None:
        if (
            self.channel is not None
            and self.channel.label == EVENTS_LABEL
            and ch is not self.channel
        ):
            return
        self.channel = ch

        def flush() -> None:
            while self.pending and ch.readyState == "open":
                ch.send(self.pending.popleft())
                self.events_sent += 1

        if ch.readyState == "open":
            flush()
        else:
            ch.on("open", flush)

    def _on_datachannel(self, ch: Any) -> None:
        ch.on("message", self._on_message)
        if ch.label == EVENTS_LABEL:
            self._use_channel(ch)

    async def _ensure_channel(self) -> None:
        await asyncio.sleep(CHANNEL_WAIT_S)
        if self.channel is None and not self.closed and self.offer.has_data_channel:
            ch = self.pc.createDataChannel(EVENTS_LABEL)
            ch.on("message", self._on_message)
            self._use_channel(ch)

    async def _pump(self) -> None:
        """Engine events out until the session closes; then the call ends too, and the
        session is untracked once both the slot and the peer connection are freed."""
        reason = "session closed"
        try:
            async for ev in self.handle.events():
                if isinstance(ev, ClosedEvent):
                    reason = f"session {ev.reason}"
                self._run(self.proto.engine_event(ev))
            await self.close(reason)  # no-op when the call is already ending
            await self.pc_closed.wait()
        finally:
            self.st.untrack(self.key, self.handle)

    # --- client messages ---

    def _on_message(self, message: Any) -> None:
        self._run(self.proto.receive(message))

    def _run(self, outputs: list[Output]) -> None:
        """Carry out what the protocol core asks: send events, drive the session."""
        h = self.handle
        for o in outputs:
            if isinstance(o, Send):
                self._send(o.event)
                continue
            if h.closed:
                continue
            try:
                if isinstance(o, PushPcm16):  # also the 40 ms of silence of a VAD-mode commit
                    h.push_audio(o.pcm, o.rate)
                elif isinstance(o, SetVad):
                    h.set_vad(o.config)
                elif isinstance(o, Configure):
                    h.configure(o.tasks)
                elif isinstance(o, Commit):
                    h.commit()
                elif isinstance(o, Clear):
                    h.clear()
                elif isinstance(o, Finish):
                    h.close(graceful=True)
                else:  # PushG711, PushImage: media comes as tracks on this transport
                    why = ValueError("on WebRTC, send audio and video as media tracks")
                    self._run(self.proto.command_failed(o, why))
            except RuntimeError:  # the engine closed the session meanwhile
                return

    # --- the end ---

    def _on_state(self) -> None:
        state_ = self.pc.connectionState
        self.log.debug("webrtc.state", state=state_)
        if state_ == "connected":
            task = asyncio.create_task(self._ensure_channel())
            self.readers.add(task)
            task.add_done_callback(self.readers.discard)
        elif state_ in ("failed", "closed") and not self.closed:
            self.closing = asyncio.create_task(self.close(f"peer connection {state_}"))

    async def close(self, reason: str = "closed") -> None:
        """End the call: peer connection closed, readers cancelled, engine session closed
        (its slot is freed, and the session untracked, when the engine confirms)."""
        if self.closed:
            return
        self.closed = True
        self.registry.calls.pop(self.id, None)
        for task in list(self.readers):
            task.cancel()
        with contextlib.suppress(RuntimeError):
            self.handle.close(graceful=False)
        await self.pc.close()
        self.pc_closed.set()
        self.log.info(
            "webrtc.summary", reason=reason, seconds=round(time.monotonic() - self.opened_at, 3),
            audio_frames=self.audio_frames, video_forwarded=self.video_forwarded,
            video_dropped=self.video_dropped, events_sent=self.events_sent,
            events_dropped=self.events_dropped,
        )  # fmt: skip


# --- HTTP handlers ----------------------------------------------------------------------


def _error(status: int, message: str, code: str = "invalid_request") -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"type": kind, "code": code, "message": message}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _cors(request: Request, response: Response) -> Response:
    """CORS for browsers on listed origins (same-origin pages need none)."""
    origin = request.headers.get("origin")
    if origin is None:
        return response
    try:
        check_origin(state(request).settings, request.headers)
    except AccessDenied:
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    response.headers["Access-Control-Expose-Headers"] = "Location, Link"
    return response


def _with_links(request: Request, response: Response) -> Response:
    for value in link_headers(state(request).settings):
        response.raw_headers.append((b"link", value.encode()))
    return _cors(request, response)


def _authorize(request: Request) -> str:
    st = state(request)
    return st.authorize(dict(request.headers), dict(request.query_params))


async def _offer(request: Request, api: str) -> Response:
    st = state(request)
    try:
        key = _authorize(request)
        st.admit(key)
    except AccessDenied as e:
        return _cors(request, _error(e.status, e.message, "access_denied"))
    try:
        response = await _start_call(request, st, key, api)
    except RequestError as e:
        log.info("webrtc.refused", api=api, status=e.status, reason=e.message)
        response = _error(e.status, e.message, e.code)
    return _with_links(request, response)


async def _body(request: Request, limit: int = MAX_SDP_BYTES) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is larger than {limit} bytes", "too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is larger than {limit} bytes", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _start_call(request: Request, st: AppState, key: str, api: str) -> Response:
    ctype_header = request.headers.get("content-type", "")
    ctype = ctype_header.split(";")[0].strip().lower()
    body = await _body(request)
    session: Any = None
    if ctype == "application/sdp":
        sdp_text = body.decode("utf-8", "replace")
    elif ctype == "multipart/form-data" and api == "calls":
        sdp_text, session = parse_multipart(ctype_header, body)
    else:
        accepted = "application/sdp" + (" or multipart/form-data" if api == "calls" else "")
        raise RequestError(
            415, f"Content-Type must be {accepted}, got {ctype or 'none'}", "unsupported_media_type"
        )
    offer = check_offer(sdp_text)
    engine = st.engine
    if engine is None:
        raise RequestError(503, "the model is still loading", "not_ready")
    call_id = ("rtc_" if api == "calls" else "whip_") + uuid.uuid4().hex[:16]
    limits = Limits(vad_available=engine.core.vad_model is not None, model=st.model_name)
    proto = RealtimeProtocol(limits, session_id=call_id)
    update = session_update(session, request.query_params)
    if update is not None:
        for o in proto.receive(json.dumps(update)):
            if isinstance(o, Send) and o.event["type"] == "error":
                raise RequestError(400, o.event["error"]["message"], o.event["error"]["code"])
    config = replace(session_config(st, proto), tasks=proto.tasks())
    structlog.contextvars.bind_contextvars(session_id=call_id)
    try:
        handle = await engine.open_session(config, session_id=call_id)
    except SessionLimitError as e:
        raise RequestError(503, str(e), "session_limit") from e
    st.track(key, handle)
    call = Call(call_id, st, calls_of(request.app), key, handle, proto, offer)
    answer = await call.answer()
    base = "/v1/realtime/calls" if api == "calls" else "/v1/whip"
    return Response(
        answer,
        status_code=201,
        media_type="application/sdp",
        headers={"Location": f"{base}/{call_id}"},
    )


async def whip(request: Request) -> Response:
    if request.method == "OPTIONS":
        return _options(request, "OPTIONS, POST")
    return await _offer(request, "whip")


async def realtime_calls(request: Request) -> Response:
    if request.method == "OPTIONS":
        return _options(request, "OPTIONS, POST")
    return await _offer(request, "calls")


def _options(request: Request, allow: str) -> Response:
    response = Response(status_code=204, headers={"Allow": allow})
    if allow.endswith("POST"):
        response.headers["Accept-Post"] = "application/sdp"
    if request.headers.get("origin") is not None:
        response.headers["Access-Control-Allow-Methods"] = allow
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, If-Match"
    return _with_links(request, response)


def _find(request: Request) -> Call:
    key = _authorize(request)
    call = calls_of(request.app).calls.get(request.path_params["call_id"])
    if call is None or call.key != key:
        raise RequestError(404, "no such session (ended already?)", "not_found")
    return call


async def session_resource(request: Request) -> Response:
    """``DELETE`` ends a call, ``PATCH`` trickles ICE candidates, ``OPTIONS`` describes."""
    allow = "OPTIONS, PATCH, DELETE"
    if request.method == "OPTIONS":
        return _options(request, allow)
    try:
        call = _find(request)
        if request.method == "PATCH":
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/trickle-ice-sdpfrag":
                raise RequestError(
                    415, "PATCH needs Content-Type application/trickle-ice-sdpfrag",
                    "unsupported_media_type",
                )  # fmt: skip
            await call.add_candidates((await _body(request)).decode("utf-8", "replace"))
            return _cors(request, Response(status_code=204))
        await call.close("deleted by client")
        return _cors(request, Response(status_code=200))
    except AccessDenied as e:
        return _cors(request, _error(e.status, e.message, "access_denied"))
    except RequestError as e:
        return _cors(request, _error(e.status, e.message, e.code))


async def hangup(request: Request) -> Response:
    """OpenAI's ``POST /v1/realtime/calls/{call_id}/hangup``: the same as DELETE."""
    try:
        call = _find(request)
    except AccessDenied as e:
        return _cors(request, _error(e.status, e.message, "access_denied"))
    except RequestError as e:
        return _cors(request, _error(e.status, e.message, e.code))
    await call.close("hung up by client")
    return _cors(request, Response(status_code=200))


def routes() -> list[BaseRoute]:
    resource_methods = ["DELETE", "PATCH", "OPTIONS"]
    return [
        Route("/v1/whip", whip, methods=["POST", "OPTIONS"]),
        Route("/v1/whip/{call_id}", session_resource, methods=resource_methods),
        Route("/v1/realtime/calls", realtime_calls, methods=["POST", "OPTIONS"]),
        Route("/v1/realtime/calls/{call_id}", session_resource, methods=resource_methods),
        Route("/v1/realtime/calls/{call_id}/hangup", hangup, methods=["POST"]),
    ]
