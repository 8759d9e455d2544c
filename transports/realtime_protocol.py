"""The OpenAI Realtime transcription protocol as a core with no I/O.

``RealtimeProtocol`` takes parsed client frames (``receive(text)``) and engine
events (``engine_event(ev)``) and returns what to do: server events to send
(``Send``) and commands for the session (``PushPcm16``, ``PushG711``, ``PushImage``,
``SetVad``, ``Configure``, ``Commit``, ``Clear``, ``Finish``). It never awaits, never
touches a socket or the engine, so every rule below is a plain unit of code; the
WebSocket endpoint (``realtime.py``) only moves bytes and runs the commands.

Design decisions:

- Items: one per speech segment of the session (rawcast's segment). An item is
  created when the engine reports the segment's start; text events are matched to
  the item by their start sample (the segment's first sample), so ids agree across
  speech_started/stopped, committed, delta and completed however the engine lags.
- ``committed`` is sent when the engine ends the segment (VAD end of speech, a
  client commit, or the segment reaching its length limit), so every ``committed``
  is followed by exactly one ``completed`` (or ``failed``). VAD segments are never
  discarded as noise (``min_speech_ms=0``) for the same reason.
- A manual commit pads the last partial 40 ms frame with silence so that all audio
  sent is in the item (media times advance by under 40 ms per commit for that).
- A commit in server_vad mode turns VAD off, appends 40 ms of silence, commits and
  turns VAD back on: it always ends exactly one segment (the open one, or a short
  one holding the silence), so it always yields one committed item.
- Items finish in media order: when an item completes, any earlier committed item
  still waiting (its decode was dropped by ``clear`` or overload) gets ``failed``.
- Media times are in ms on the session's 16 kHz sample clock (samples / 16).
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from rawcast.pipeline.media import ClosedEvent, ErrorEvent, Event, SpeechEvent, TextEvent
from rawcast.pipeline.session import Tasks
from rawcast.pipeline.vad import VadConfig

PCM_RATES = (24000, 16000, 48000)  # 24000 is OpenAI's; 16000 and 48000 are rawcast extensions
G711 = {"audio/pcmu": "pcm_mulaw", "audio/pcma": "pcm_alaw"}
MIN_COMMIT_MS = 100.0
MAX_IMAGE_PIXELS = 4096 * 4096
VAD_EAGERNESS = ("low", "medium", "high", "auto")
NOISE_REDUCTION = ("near_field", "far_field")
SERVER_VAD_DEFAULTS: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
}
TRANSCRIPT = "conversation.item.input_audio_transcription"
KEPT_ITEMS = 64  # recent items remembered for matching late text events


# --- what the core asks the I/O layer to do ---------------------------------------------------


@dataclass(frozen=True)
class Send:
    event: dict[str, Any]


@dataclass(frozen=True, eq=False)
class PushPcm16:
    pcm: npt.NDArray[np.int16]
    rate: int


@dataclass(frozen=True)
class PushG711:
    data: bytes
    codec: str  # PyAV decoder name: pcm_mulaw or pcm_alaw


@dataclass(frozen=True)
class PushImage:
    data: bytes
    time_s: float
    event_id: str | None


@dataclass(frozen=True)
class SetVad:
    config: VadConfig | None


@dataclass(frozen=True)
class Configure:
    tasks: Tasks


@dataclass(frozen=True)
class Commit:
    """End the open segment; ``pad``: first pad the partial last frame with silence, so
    that all audio sent so far is in the segment (``SessionHandle.flush``)."""

    pad: bool = False


@dataclass(frozen=True)
class Clear:
    pass


@dataclass(frozen=True)
class Finish:
    """Flush the open segment, finish every decode, then close the session."""


Output = Send | PushPcm16 | PushG711 | PushImage | SetVad | Configure | Commit | Clear | Finish


class ProtocolError(Exception):
    """A client event the server refuses; becomes an ``error`` server event."""

    def __init__(
        self, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.kind = kind


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def error_event(
    code: str,
    message: str,
    param: str | None = None,
    event_id: str | None = None,
    kind: str = "invalid_request_error",
) -> dict[str, Any]:
    return {
        "type": "error",
        "event_id": new_id("event"),
        "error": {
            "type": kind,
            "code": code,
            "message": message,
            "param": param,
            "event_id": event_id,
        },
    }


# --- decoding helpers (blocking: the I/O layer runs them off the event loop) -----------------


def decode_g711(data: bytes, codec: str) -> npt.NDArray[np.int16]:
    """G.711 mu-law or A-law bytes (8 kHz mono) to int16 samples, with PyAV's decoder."""
    ctx = av.AudioCodecContext.create(codec, "r")
    assert isinstance(ctx, av.AudioCodecContext)
    ctx.sample_rate = 8000
    ctx.layout = "mono"
    frames = [*ctx.decode(av.Packet(data)), *ctx.decode(None)]
    if not frames:
        return np.zeros(0, np.int16)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16)


def decode_image(data: bytes) -> npt.NDArray[np.uint8]:
    """A JPEG or PNG to an RGB uint8 (H, W, 3) array; ValueError on anything else."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG"):
                raise ValueError(f"expected a JPEG or PNG image, got {im.format}")
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image of {im.width}x{im.height} exceeds 4096x4096 pixels")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode the image: {e}") from e


# --- the core ---------------------------------------------------------------------------------


@dataclass
class Item:
    id: str
    start_sample: int
    stopped: bool = False
    committed: bool = False
    completed: bool = False
    dropped: bool = False  # cleared before it was committed: its text is ignored


@dataclass
class Limits:
    vad_available: bool = True
    model: str = "rawcast"


@dataclass
class RealtimeProtocol:
    """One connection's protocol state. See the module docstring."""

    limits: Limits = field(default_factory=Limits)
    session_id: str = field(default_factory=lambda: new_id("sess"))

    def __post_init__(self) -> None:
        vad = self.limits.vad_available
        self.session: dict[str, Any] = {
            "id": self.session_id,
            "object": "realtime.transcription_session",
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "noise_reduction": None,
                    "transcription": {"model": self.limits.model, "language": None, "prompt": ""},
                    "turn_detection": dict(SERVER_VAD_DEFAULTS) if vad else None,
                }
            },
            "include": None,
            "rawcast": {"translate": None, "captions": False},
        }
        self.items: deque[Item] = deque(maxlen=KEPT_ITEMS)
        self.open_item: Item | None = None
        self.last_committed: str | None = None
        self.buffered_ms = 0.0  # client audio since the last commit or clear
        self.audio_ms = 0.0  # all client audio, for images sent without a time
        self.closing = False
        self.events_in = 0
        self.events_out = 0
        self.errors = 0

    # --- derived settings ---

    @property
    def input(self) -> dict[str, Any]:
        inp: dict[str, Any] = self.session["audio"]["input"]
        return inp

    @property
    def vad_mode(self) -> bool:
        return self.input["turn_detection"] is not None

    def vad_config(self) -> VadConfig | None:
        td = self.input["turn_detection"]
        if td is None:
            return None
        if td["type"] == "semantic_vad":  # rawcast has one VAD: semantic_vad is server_vad
            td = SERVER_VAD_DEFAULTS
        return VadConfig(
            threshold=float(td["threshold"]),
            min_silence_ms=int(td["silence_duration_ms"]),
            min_speech_ms=0,  # never drop a segment as noise: each committed item completes
        )

    def tasks(self) -> Tasks:
        rc = self.session["rawcast"]
        return Tasks(transcribe=True, translate=rc["translate"], caption=bool(rc["captions"]))

    def _rate(self) -> int:
        fmt = self.input["format"]
        return 8000 if fmt["type"] in G711 else int(fmt["rate"])

    # --- events out ---

    def _send(self, event: dict[str, Any]) -> Send:
        self.events_out += 1
        if event["type"] == "error":
            self.errors += 1
        return Send({"event_id": new_id("event"), **event} if "event_id" not in event else event)

    def start(self) -> list[Output]:
        """What to send when the connection opens."""
        return [self._send({"type": "session.created", "session": copy.deepcopy(self.session)})]

    # --- client frames in ---

    def receive(self, text: str | bytes) -> list[Output]:
        """One client frame: parse, validate, and turn it into outputs (errors included)."""
        self.events_in += 1
        event_id: str | None = None
        try:
            try:
                ev = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ProtocolError("invalid_json", f"the message is not valid JSON: {e}") from e
            if not isinstance(ev, dict):
                raise ProtocolError("invalid_json", "the message must be a JSON object")
            eid = ev.get("event_id")
            event_id = eid if isinstance(eid, str) else None
            kind = ev.get("type")
            if kind is None:
                raise ProtocolError("missing_required_parameter", "missing 'type'", "type")
            if self.closing:
                raise ProtocolError(
                    "session_closing", "rawcast.session.close was sent; no more events", "type"
                )
            handler = self._handlers().get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ProtocolError(
                    "unknown_event_type",
                    f"unknown event type {kind!r}; supported: {', '.join(self._handlers())}",
                    "type",
                )
            return handler(ev, event_id)
        except ProtocolError as e:
            self.errors += 1
            self.events_out += 1
            return [Send(error_event(e.code, e.message, e.param, event_id, e.kind))]

    def _handlers(self) -> dict[str, Any]:
        return {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "rawcast.input_image.append": self._on_image,
            "rawcast.session.close": self._on_close,
        }

    def command_failed(self, cmd: Output, exc: Exception) -> list[Output]:
        """A command the I/O layer could not run (an undecodable image or G.711 payload)."""
        if isinstance(cmd, PushImage):
            err = error_event("invalid_image", str(exc), "image", cmd.event_id)
        else:
            err = error_event("invalid_audio", str(exc), "audio")
        return [self._send(err)]

    # session.update

    def _on_session_update(self, ev: dict[str, Any], event_id: str | None) -> list[Output]:
        s = _field(ev, "session", dict)
        kind = s.get("type")
        if kind is None:
            raise ProtocolError(
                "missing_required_parameter", "missing 'session.type'", "session.type"
            )
        if kind != "transcription":
            raise ProtocolError(
                "unsupported_session_type",
                f"session.type {kind!r} is not supported: this server only runs "
                "'transcription' sessions",
                "session.type",
            )
        new = copy.deepcopy(self.session)
        inp = new["audio"]["input"]
        audio = _opt(s, "audio", dict, "session")
        if audio is not None:
            a_in = _opt(audio, "input", dict, "session.audio")
            if a_in is not None:
                if "format" in a_in:
                    inp["format"] = _format(a_in["format"])
                if "turn_detection" in a_in:
                    inp["turn_detection"] = _turn_detection(
                        a_in["turn_detection"], self.limits.vad_available
                    )
                if "transcription" in a_in:
                    inp["transcription"] = _transcription(a_in["transcription"], inp)
                if "noise_reduction" in a_in:
                    inp["noise_reduction"] = _noise_reduction(a_in["noise_reduction"])
        if "include" in s:
            inc = s["include"]
            if inc is not None and not (
                isinstance(inc, list) and all(isinstance(x, str) for x in inc)
            ):
                raise ProtocolError(
                    "invalid_type", "session.include must be a list of strings", "session.include"
                )
            new["include"] = inc
        rc = _opt(s, "rawcast", dict, "session")
        if rc is not None:
            new["rawcast"] = _rawcast(rc, new["rawcast"])
        out: list[Output] = []
        old_vad, old_tasks = self.vad_config(), self.tasks()
        self.session = new
        if self.vad_config() != old_vad:
            out.append(SetVad(self.vad_config()))
        if self.tasks() != old_tasks:
            out.append(Configure(self.tasks()))
        out.append(self._send({"type": "session.updated", "session": copy.deepcopy(new)}))
        return out

    # input_audio_buffer.*

    def _on_append(self, ev: dict[str, Any], event_id: str | None) -> list[Output]:
        raw = _b64(ev, "audio")
        fmt = self.input["format"]
        if fmt["type"] in G711:
            n, rate = len(raw), 8000
            cmd: Output = PushG711(raw, G711[fmt["type"]])
        else:
            if len(raw) % 2:
                raise ProtocolError(
                    "invalid_audio_length",
                    f"PCM16 audio must have an even number of bytes, got {len(raw)}",
                    "audio",
                )
            n, rate = len(raw) // 2, int(fmt["rate"])
            cmd = PushPcm16(np.frombuffer(raw, dtype="<i2").astype(np.int16), rate)
        if n == 0:
            return []
        ms = 1000.0 * n / rate
        self.buffered_ms += ms
        self.audio_ms += ms
        return [cmd]

    def _on_commit(self, ev: dict[str, Any], event_id: str | None) -> list[Output]:
        if self.buffered_ms < MIN_COMMIT_MS:
            raise ProtocolError(
                "input_audio_buffer_commit_empty",
                f"Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS:.0f}ms of audio, but buffer only has "
                f"{self.buffered_ms:.2f}ms of audio.",
            )
        self.buffered_ms = 0.0
        if not self.vad_mode:
            return [Commit(pad=True)]
        rate = self._rate()
        silence = np.zeros(rate // 25, np.int16)  # 40 ms: always completes one frame
        return [SetVad(None), PushPcm16(silence, rate), Commit(), SetVad(self.vad_config())]

    def _on_clear(self, ev: dict[str, Any], event_id: str | None) -> list[Output]:
        self.buffered_ms = 0.0
        if self.open_item is not None:
            self.open_item.dropped = True
            self.open_item = None
        return [Clear(), self._send({"type": "input_audio_buffer.cleared"})]

    # rawcast.*

    def _on_image(self, ev: dict[str, Any], event_id: str | None) -> list[Output]:
        if not self.session["rawcast"]["captions"]:
            raise ProtocolError(
                "captions_not_enabled",
                "turn captions on first: session.update with session.rawcast.captions = true",
                "type",
            )
        raw = _b64(ev, "image")
        if not raw:
            raise ProtocolError("invalid_image", "the image is empty", "image")
        t = ev.get("time_ms")
        if t is None:
            time_s = self.audio_ms / 1000.0
        elif isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t < 1e12:
            time_s = float(t) / 1000.0
        else:
            raise ProtocolError("invalid_value", "time_ms must be a number >= 0", "time_ms")
        return [PushImage(raw, time_s, event_id)]

    def _on_close(self, ev: dict[str, Any], event_id: str | None) -> list[Output]:
        self.closing = True
        return [Finish()]

    # --- engine events in ---

    def engine_event(self, ev: Event) -> list[Output]:
        if isinstance(ev, SpeechEvent):
            return self._on_speech(ev)
        if isinstance(ev, TextEvent):
            return self._on_text(ev)
        if isinstance(ev, ErrorEvent):
            return [self._send(error_event(ev.code, ev.message, kind="server_error"))]
        assert isinstance(ev, ClosedEvent)
        out = self._fail_waiting(None, "session closed before transcription finished")
        if self.closing:
            out.append(self._send({"type": "rawcast.session.closed", "reason": ev.reason}))
        return out

    def _on_speech(self, ev: SpeechEvent) -> list[Output]:
        out: list[Output] = []
        ms = ev.sample // 16
        if ev.kind == "started":
            if self.open_item is not None:  # never stopped: its audio was cleared
                self.open_item.dropped = True
            item = Item(new_id("item"), ev.sample)
            self.items.append(item)
            self.open_item = item
            if self.vad_mode:
                out.append(
                    self._send(
                        {
                            "type": "input_audio_buffer.speech_started",
                            "item_id": item.id,
                            "audio_start_ms": ms,
                        }
                    )
                )
            return out
        stopped = self.open_item
        if stopped is None:
            return out
        self.open_item = None
        stopped.stopped = True
        if self.vad_mode:
            self.buffered_ms = 0.0
            out.append(
                self._send(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "item_id": stopped.id,
                        "audio_end_ms": ms,
                    }
                )
            )
        if not stopped.committed:  # a continuation's text may have committed it already
            out.append(self._commit(stopped))
        return out

    def _commit(self, item: Item) -> Send:
        item.committed = True
        prev, self.last_committed = self.last_committed, item.id
        return self._send(
            {"type": "input_audio_buffer.committed", "item_id": item.id, "previous_item_id": prev}
        )

    def _item_for(self, sample: int) -> Item | None:
        found = None
        for it in self.items:
            if it.start_sample <= sample:
                found = it
            else:
                break
        return found

    def _on_text(self, ev: TextEvent) -> list[Output]:
        times = {"start_ms": ev.start_sample // 16, "end_ms": ev.end_sample // 16}
        if ev.task == "caption":
            return [
                self._send(
                    {
                        "type": "rawcast.caption.completed",
                        "item_id": f"{self.session_id}_caption_{ev.segment_id}",
                        "text": ev.text,
                        **times,
                    }
                )
            ]
        item = self._item_for(ev.start_sample)
        if item is None or item.dropped:
            return []
        if item.completed and ev.start_sample > item.start_sample:
            item = self._continuation(item, ev.start_sample)
        if ev.task == "translate":
            lang = {"language": ev.language}
            if ev.final:
                body = {"type": "rawcast.translation.completed", "text": ev.text, **lang, **times}
            else:
                body = {"type": "rawcast.translation.delta", "delta": ev.text, **lang}
            return [self._send({**body, "item_id": item.id})]
        if item.completed:  # failed already (cleared), or a late duplicate
            return []
        if not ev.final:
            return [
                self._send(
                    {
                        "type": f"{TRANSCRIPT}.delta",
                        "item_id": item.id,
                        "content_index": 0,
                        "delta": ev.text,
                    }
                )
            ]
        out = self._fail_waiting(item, "its audio was cleared or dropped before transcription")
        if not item.committed:
            out.append(self._commit(item))
        item.completed = True
        seconds = round((ev.end_sample - ev.start_sample) / 16000, 3)
        out.append(
            self._send(
                {
                    "type": f"{TRANSCRIPT}.completed",
                    "item_id": item.id,
                    "content_index": 0,
                    "transcript": ev.text,
                    "usage": {"type": "duration", "seconds": seconds},
                    "rawcast": times,
                }
            )
        )
        return out

    def _continuation(self, done: Item, sample: int) -> Item:
        """A new item for text that starts inside a completed item: the engine cut a long
        segment (its slot was full) and goes on in a fresh one with no speech events. The
        continuation takes over the open item, so the speech_stopped still to come
        commits it."""
        item = Item(new_id("item"), sample, stopped=done.stopped)
        self.items.insert(self.items.index(done) + 1, item)
        if self.open_item is done:
            self.open_item = item
        return item

    def _fail_waiting(self, before: Item | None, why: str) -> list[Output]:
        """Committed items older than ``before`` (all, if None) that will get no text."""
        out: list[Output] = []
        for it in self.items:
            if it is before:
                break
            if it.committed and not it.completed:
                it.completed = True
                err = {"type": "server_error", "code": "transcription_cancelled", "message": why}
                out.append(
                    self._send(
                        {
                            "type": f"{TRANSCRIPT}.failed",
                            "item_id": it.id,
                            "content_index": 0,
                            "error": {**err, "param": None},
                        }
                    )
                )
        return out


# --- validation helpers -----------------------------------------------------------------------


def _field(obj: dict[str, Any], name: str, typ: type, prefix: str = "") -> Any:
    path = f"{prefix}.{name}" if prefix else name
    if name not in obj:
        raise ProtocolError("missing_required_parameter", f"missing '{path}'", path)
    return _check(obj[name], typ, path)


def _opt(obj: dict[str, Any], name: str, typ: type, prefix: str = "") -> Any:
    v = obj.get(name)
    return None if v is None else _check(v, typ, f"{prefix}.{name}" if prefix else name)


def _check(v: Any, typ: type, path: str) -> Any:
    if not isinstance(v, typ) or (typ in (int, float) and isinstance(v, bool)):
        raise ProtocolError("invalid_type", f"'{path}' must be {_TYPE_NAMES[typ]}", path)
    return v


_TYPE_NAMES: dict[type, str] = {dict: "an object", str: "a string", list: "a list", bool: "a bool"}


def _number(obj: dict[str, Any], name: str, path: str, lo: float, hi: float) -> float:
    v = obj[name]
    if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(
            "invalid_value", f"'{path}.{name}' must be a number in [{lo}, {hi}]", f"{path}.{name}"
        )
    return float(v)


def _b64(ev: dict[str, Any], name: str) -> bytes:
    s = _field(ev, name, str)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError("invalid_base64", f"'{name}' is not valid base64: {e}", name) from e


def _format(fmt: Any) -> dict[str, Any]:
    path = "session.audio.input.format"
    if not isinstance(fmt, dict) or "type" not in fmt:
        raise ProtocolError("invalid_value", f"'{path}' must be an object with a 'type'", path)
    kind, rate = fmt["type"], fmt.get("rate")
    if kind == "audio/pcm":
        rate = 24000 if rate is None else rate
        if rate not in PCM_RATES or isinstance(rate, bool):
            raise ProtocolError(
                "unsupported_audio_format",
                f"audio/pcm at {rate} Hz is not supported; use 24000 (or 16000, 48000)",
                f"{path}.rate",
            )
        return {"type": kind, "rate": int(rate)}
    if kind in G711:
        if rate not in (None, 8000):
            raise ProtocolError(
                "unsupported_audio_format", f"{kind} is 8000 Hz only, got {rate}", f"{path}.rate"
            )
        return {"type": kind}
    raise ProtocolError(
        "unsupported_audio_format",
        f"audio format {kind!r} is not supported; use audio/pcm, audio/pcmu or audio/pcma",
        f"{path}.type",
    )


def _turn_detection(td: Any, vad_available: bool) -> dict[str, Any] | None:
    path = "session.audio.input.turn_detection"
    if td is None:
        return None
    if not isinstance(td, dict) or td.get("type") not in ("server_vad", "semantic_vad"):
        raise ProtocolError(
            "invalid_value",
            f"'{path}' must be null or an object of type server_vad or semantic_vad",
            f"{path}.type",
        )
    if not vad_available:
        raise ProtocolError(
            "turn_detection_unavailable",
            "this server runs without voice activity detection: set turn_detection to null",
            path,
        )
    if td["type"] == "semantic_vad":
        eagerness = td.get("eagerness", "auto")
        if eagerness not in VAD_EAGERNESS:
            raise ProtocolError(
                "invalid_value", f"eagerness must be one of {VAD_EAGERNESS}", f"{path}.eagerness"
            )
        return {"type": "semantic_vad", "eagerness": eagerness}
    out = {**SERVER_VAD_DEFAULTS, **{k: v for k, v in td.items() if v is not None}}
    _number(out, "threshold", path, 0.01, 0.99)
    _number(out, "prefix_padding_ms", path, 0, 10_000)
    _number(out, "silence_duration_ms", path, 40, 10_000)
    return out


def _transcription(tr: Any, inp: dict[str, Any]) -> dict[str, Any]:
    path = "session.audio.input.transcription"
    if tr is None:
        return dict(inp["transcription"])
    _check(tr, dict, path)
    out = dict(inp["transcription"] or {})
    for key in ("model", "language", "prompt"):
        if key in tr:
            if tr[key] is not None and not isinstance(tr[key], str):
                raise ProtocolError("invalid_type", f"'{path}.{key}' must be a string", path)
            out[key] = tr[key]
    return out


def _noise_reduction(nr: Any) -> dict[str, Any] | None:
    path = "session.audio.input.noise_reduction"
    if nr is None:
        return None
    if not isinstance(nr, dict) or nr.get("type") not in NOISE_REDUCTION:
        raise ProtocolError(
            "invalid_value", f"'{path}' must be null or near_field/far_field", f"{path}.type"
        )
    return {"type": nr["type"]}


def _rawcast(rc: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    out = dict(old)
    if "translate" in rc:
        lang = rc["translate"]
        if lang is not None and (not isinstance(lang, str) or not 0 < len(lang) <= 40):
            raise ProtocolError(
                "invalid_value",
                "'session.rawcast.translate' must be a language name or null",
                "session.rawcast.translate",
            )
        out["translate"] = lang or None
    if "captions" in rc:
        out["captions"] = _check(rc["captions"], bool, "session.rawcast.captions")
    unknown = set(rc) - {"translate", "captions"}
    if unknown:
        name = sorted(unknown)[0]
        raise ProtocolError(
            "unknown_parameter", f"unknown parameter 'session.rawcast.{name}'", "session.rawcast"
        )
    return out


__all__ = [
    "Clear",
    "Commit",
    "Configure",
    "Finish",
    "Limits",
    "Output",
    "ProtocolError",
    "PushG711",
    "PushImage",
    "PushPcm16",
    "RealtimeProtocol",
    "Send",
    "SetVad",
    "decode_g711",
    "decode_image",
    "error_event",
]
