"""WebSocket /v1/realtime: the OpenAI Realtime transcription protocol over real loopback sockets.

One in-process server (uvicorn in a thread, tiny random model, Silero VAD) serves the
module; the official ``openai`` SDK and a plain ``websockets`` client talk to it.
Server events are validated strictly against the SDK's pydantic models.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import gc
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, get_args

import av
import numpy as np
import numpy.typing as npt
import pytest
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent
from PIL import Image
from pydantic import BaseModel
from server_helpers import serve
from tiny_model import fixture_pcm, tiny_model
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rawcast.model.gemma4 import Gemma4Unified
from rawcast.pipeline.engine import Engine, EngineConfig, SessionHandle
from rawcast.pipeline.session import Session, SessionConfig
from rawcast.pipeline.vad import SileroModel
from rawcast.transports.app import AppState, create_app
from rawcast.transports.realtime import Connection
from rawcast.transports.realtime_protocol import RealtimeProtocol
from rawcast.transports.settings import ServerSettings

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MESSAGE = 512 * 1024
TUNING = {"realtime.decode_interval_ms": "1200", "realtime.max_new_tokens": "6"}
TRANSCRIPT = "conversation.item.input_audio_transcription"
TIMEOUT = 60.0

# The SDK's server event classes by their ``type`` literal, for strict validation.
SDK_EVENTS: dict[str, type[BaseModel]] = {
    get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in get_args(get_args(RealtimeServerEvent)[0])
}


def strict(ev: dict[str, Any]) -> BaseModel | None:
    """Validate an OpenAI event against its SDK model (None for rawcast.* events)."""
    assert isinstance(ev.get("event_id"), str) and ev["event_id"]
    if ev["type"].startswith("rawcast."):
        return None
    return SDK_EVENTS[ev["type"]].model_validate(ev)


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Gemma4Unified:
    return tiny_model()


@pytest.fixture(scope="module")
def vad() -> SileroModel:
    return SileroModel()


@pytest.fixture(scope="module")
def server(model: Gemma4Unified, vad: SileroModel) -> Iterator[tuple[str, AppState]]:
    engine = Engine(model, EngineConfig(max_sessions=6), vad_model=vad)
    settings = ServerSettings(
        api_keys=(KEY,), max_message_bytes=MAX_MESSAGE, drain_timeout_s=5, extra=TUNING
    )
    app = create_app(settings, engine=engine)
    with serve(app) as url:
        yield url, app.state.rawcast


def ws_url(base: str, query: str = "?intent=transcription") -> str:
    return base.replace("http://", "ws://") + "/v1/realtime" + query


def resample(pcm: npt.NDArray[np.float32], rate: int) -> npt.NDArray[np.int16]:
    frame = av.AudioFrame.from_ndarray(
        (pcm * 32767).astype(np.int16)[None], format="s16", layout="mono"
    )
    frame.sample_rate = 16000
    r = av.AudioResampler(format="s16", layout="mono", rate=rate)
    parts = [f.to_ndarray().reshape(-1) for f in [*r.resample(frame), *r.resample(None)]]
    return np.concatenate(parts).astype(np.int16)


CLIP = fixture_pcm()
CLIP24 = resample(CLIP, 24000)


def b64(pcm: npt.NDArray[np.int16] | bytes) -> str:
    return base64.b64encode(pcm if isinstance(pcm, bytes) else pcm.tobytes()).decode()


@pytest.fixture
async def client(server: tuple[str, AppState]) -> AsyncIterator[ClientConnection]:
    async with connect(ws_url(server[0]), additional_headers=AUTH, max_size=None) as ws:
        yield ws


async def recv(ws: ClientConnection, wait: float = TIMEOUT, check: bool = True) -> dict[str, Any]:
    """The next server event, validated strictly unless ``check`` is false."""
    ev: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), wait))
    if check:
        strict(ev)
    return ev


async def recv_until(
    ws: ClientConnection, kind: str, wait: float = TIMEOUT
) -> list[dict[str, Any]]:
    """Events up to and including the first of type ``kind``."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait
    while not got or got[-1]["type"] != kind:
        got.append(await recv(ws, max(0.1, deadline - time.monotonic())))
    return got


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def manual_session(ws: ClientConnection, fresh: bool = True) -> None:
    """Turn VAD off (after reading session.created on a ``fresh`` connection)."""
    if fresh:
        await recv_until(ws, "session.created")
    await send(
        ws,
        {
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}},
        },
    )
    await recv_until(ws, "session.updated")


async def transcribe_once(base: str) -> dict[str, Any]:
    """A well-behaved client: manual commit of the clip; returns its completed event."""
    async with connect(ws_url(base), additional_headers=AUTH) as ws:
        await manual_session(ws)
        await send(ws, {"type": "input_audio_buffer.append", "audio": b64(CLIP24)})
        await send(ws, {"type": "input_audio_buffer.commit"})
        return (await recv_until(ws, f"{TRANSCRIPT}.completed"))[-1]


# --- the official SDK ---------------------------------------------------------------------------


async def test_sdk_manual_commit(server: tuple[str, AppState]) -> None:
    """The openai SDK configures a transcription session with turn_detection null, appends
    24 kHz PCM16, commits, and gets committed then completed for the same item; every event
    passes the SDK's strict models."""
    client = AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY)
    events: list[dict[str, Any]] = []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        first = await asyncio.wait_for(conn.recv(), TIMEOUT)
        assert first.type == "session.created"
        await conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                        "turn_detection": None,
                    }
                },
            }
        )
        for i in range(0, CLIP24.size, 4800):
            await conn.input_audio_buffer.append(audio=b64(CLIP24[i : i + 4800]))
        await conn.input_audio_buffer.commit()
        while not events or events[-1]["type"] != f"{TRANSCRIPT}.completed":
            got = await asyncio.wait_for(conn.recv(), TIMEOUT)
            events.append(got.to_dict())
    for e in [first.to_dict(), *events]:
        strict(e)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session.updated"
    updated = events[0]["session"]
    assert updated["audio"]["input"]["turn_detection"] is None
    assert updated["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"
    assert "input_audio_buffer.speech_started" not in kinds  # manual mode: no VAD events
    committed = next(e for e in events if e["type"] == "input_audio_buffer.committed")
    completed = events[-1]
    assert committed["item_id"] == completed["item_id"]
    assert committed["previous_item_id"] is None
    assert completed["usage"]["type"] == "duration"
    assert abs(completed["usage"]["seconds"] - CLIP.size / 16000) < 0.1
    deltas = [e for e in events if e["type"] == f"{TRANSCRIPT}.delta"]
    assert all(d["item_id"] == completed["item_id"] and d["content_index"] == 0 for d in deltas)
    assert len({e["event_id"] for e in events}) == len(events)


async def test_sdk_server_vad(server: tuple[str, AppState]) -> None:
    """With server_vad (the default) the SDK gets speech_started, speech_stopped, committed and
    completed with one item id per utterance, and times in ms from the audio clock."""
    client = AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY)
    silence = np.zeros(24000, np.int16)
    audio = np.concatenate([silence, CLIP24, silence, silence])
    events: list[dict[str, Any]] = []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = await asyncio.wait_for(conn.recv(), TIMEOUT)
        session: Any = created.to_dict()["session"]
        td = session["audio"]["input"]["turn_detection"]
        assert td["type"] == "server_vad"
        await conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "turn_detection": {
                            "type": "server_vad",
                            "threshold": 0.5,
                            "prefix_padding_ms": 300,
                            "silence_duration_ms": 500,
                        }
                    }
                },
            }
        )
        for i in range(0, audio.size, 4800):
            await conn.input_audio_buffer.append(audio=b64(audio[i : i + 4800]))
        while not events or events[-1]["type"] != f"{TRANSCRIPT}.completed":
            got = await asyncio.wait_for(conn.recv(), TIMEOUT)
            events.append(got.to_dict())
    for e in events:
        strict(e)
    by_type = {e["type"]: e for e in events}
    started = by_type["input_audio_buffer.speech_started"]
    stopped = by_type["input_audio_buffer.speech_stopped"]
    committed = by_type["input_audio_buffer.committed"]
    completed = by_type[f"{TRANSCRIPT}.completed"]
    ids = {started["item_id"], stopped["item_id"], committed["item_id"], completed["item_id"]}
    assert len(ids) == 1
    assert 500 <= started["audio_start_ms"] < 1300  # speech starts after 1 s of silence
    assert started["audio_start_ms"] + 2500 < stopped["audio_end_ms"] < 6000
    kinds = [e["type"] for e in events]
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index(
        "input_audio_buffer.committed"
    )


# --- session configuration ----------------------------------------------------------------------


async def test_session_update_merges_and_echoes(client: ClientConnection) -> None:
    """session.created holds the full default config; a partial session.update changes only
    what it names; the 16 kHz extension rate, G.711 and semantic_vad are echoed as set."""
    created = await recv(client)
    assert created["type"] == "session.created"
    sess = created["session"]
    assert sess["type"] == "transcription"
    assert sess["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert sess["rawcast"] == {"translate": None, "captions": False}
    update: Any = {"type": "transcription", "audio": {"input": {"format": {"rate": 16000}}}}
    await send(client, {"type": "session.update", "session": update})
    err = await recv(client)
    assert err["type"] == "error" and err["error"]["param"] == "session.audio.input.format"
    update["audio"]["input"]["format"]["type"] = "audio/pcm"
    await send(client, {"type": "session.update", "session": update})
    upd = (await recv(client, check=False))["session"]  # the SDK's models know 24000 only
    assert upd["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}
    assert upd["audio"]["input"]["turn_detection"] == sess["audio"]["input"]["turn_detection"]
    td = {"type": "semantic_vad", "eagerness": "high"}
    fmt = {"type": "audio/pcmu"}
    await send(
        client,
        {
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": {"turn_detection": td}}},
        },
    )
    assert (await recv(client, check=False))["session"]["audio"]["input"]["turn_detection"] == td
    await send(
        client,
        {
            "type": "session.update",
            "session": {"type": "transcription", "audio": {"input": {"format": fmt}}},
        },
    )
    last = (await recv(client))["session"]["audio"]["input"]
    assert last["format"] == fmt and last["turn_detection"] == td


async def test_g711_pcmu(server: tuple[str, AppState]) -> None:
    """audio/pcmu (G.711 mu-law, 8 kHz) is decoded and transcribed like PCM."""
    pcm8 = resample(CLIP, 8000)
    enc = av.CodecContext.create("pcm_mulaw", "w")
    assert isinstance(enc, av.AudioCodecContext)
    enc.sample_rate, enc.layout, enc.format = 8000, "mono", "s16"
    frame = av.AudioFrame.from_ndarray(pcm8[None], format="s16", layout="mono")
    frame.sample_rate = 8000
    ulaw = b"".join(bytes(p) for p in [*enc.encode(frame), *enc.encode(None)])
    assert len(ulaw) == pcm8.size
    async with connect(ws_url(server[0], ""), additional_headers=AUTH) as ws:
        await recv(ws)
        inp = {"format": {"type": "audio/pcmu"}, "turn_detection": None}
        await send(
            ws,
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": inp}},
            },
        )
        await recv_until(ws, "session.updated")
        await send(ws, {"type": "input_audio_buffer.append", "audio": b64(ulaw)})
        await send(ws, {"type": "input_audio_buffer.commit"})
        done = (await recv_until(ws, f"{TRANSCRIPT}.completed"))[-1]
    assert abs(done["usage"]["seconds"] - pcm8.size / 8000) < 0.1


async def test_clear_then_commit_is_empty(client: ClientConnection) -> None:
    """clear answers cleared and empties the buffer: a commit right after is refused with
    input_audio_buffer_commit_empty, as is a commit of under 100 ms."""
    await manual_session(client)
    await send(client, {"type": "input_audio_buffer.append", "audio": b64(CLIP24[:24000])})
    await send(client, {"type": "input_audio_buffer.clear"})
    assert (await recv(client))["type"] == "input_audio_buffer.cleared"
    await send(client, {"type": "input_audio_buffer.commit", "event_id": "c1"})
    err = await recv(client)
    assert err["error"]["code"] == "input_audio_buffer_commit_empty"
    assert err["error"]["event_id"] == "c1"
    await send(client, {"type": "input_audio_buffer.append", "audio": b64(CLIP24[:2000])})
    await send(client, {"type": "input_audio_buffer.commit"})
    err = await recv(client)
    assert err["error"]["code"] == "input_audio_buffer_commit_empty"
    assert "buffer too small" in err["error"]["message"]


# --- bad input ------------------------------------------------------------------------------------

BAD_EVENTS: list[tuple[str, str, str | None]] = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_json", None),
    (json.dumps({"audio": "AAAA"}), "missing_required_parameter", "type"),
    (json.dumps({"type": "response.create"}), "unknown_event_type", "type"),
    (json.dumps({"type": "input_audio_buffer.append"}), "missing_required_parameter", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 5}), "invalid_type", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_base64", "audio"),
    (
        json.dumps({"type": "input_audio_buffer.append", "audio": b64(b"\x00\x01\x02")}),
        "invalid_audio_length",
        "audio",
    ),
    (json.dumps({"type": "session.update"}), "missing_required_parameter", "session"),
    (json.dumps({"type": "session.update", "session": {}}), "missing_required_parameter", None),
    (
        json.dumps({"type": "session.update", "session": {"type": "realtime"}}),
        "unsupported_session_type",
        "session.type",
    ),
    (
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {"input": {"format": {"type": "audio/opus"}}},
                },
            }
        ),
        "unsupported_audio_format",
        "session.audio.input.format.type",
    ),
    (
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 11025}}},
                },
            }
        ),
        "unsupported_audio_format",
        "session.audio.input.format.rate",
    ),
    (
        json.dumps({"type": "rawcast.input_image.append", "image": b64(b"\x89PNG")}),
        "captions_not_enabled",
        "type",
    ),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", None),
]


async def test_bad_events_get_errors_and_others_continue(server: tuple[str, AppState]) -> None:
    """Each malformed or invalid client event gets an OpenAI-shaped error with a clear code,
    the session stays usable, and a concurrent session still gets its transcript."""
    good = asyncio.create_task(transcribe_once(server[0]))
    async with connect(ws_url(server[0], "?model=x&foo=bar"), additional_headers=AUTH) as ws:
        await recv(ws)
        for text, code, param in BAD_EVENTS:
            await ws.send(text)
            err = await recv(ws)
            assert err["type"] == "error", text
            assert err["error"]["code"] == code, (text, err)
            assert err["error"]["message"]
            if param is not None:
                assert err["error"]["param"] == param, (text, err)
        # the session still works after all that
        await manual_session(ws, fresh=False)
        await send(ws, {"type": "input_audio_buffer.append", "audio": b64(CLIP24)})
        await send(ws, {"type": "input_audio_buffer.commit"})
        assert (await recv_until(ws, f"{TRANSCRIPT}.completed"))[-1]["transcript"] is not None
    assert (await asyncio.wait_for(good, TIMEOUT))["type"] == f"{TRANSCRIPT}.completed"


async def test_undecodable_image(server: tuple[str, AppState]) -> None:
    """An image that is not a JPEG/PNG gets invalid_image (decoded off the loop), a bad
    image time gets invalid_value; a concurrent session still gets its transcript."""
    good = asyncio.create_task(transcribe_once(server[0]))
    async with connect(ws_url(server[0]), additional_headers=AUTH) as ws:
        await recv(ws)
        rc = {"captions": True}
        await send(
            ws, {"type": "session.update", "session": {"type": "transcription", "rawcast": rc}}
        )
        assert (await recv(ws))["session"]["rawcast"]["captions"] is True
        bad = {"type": "rawcast.input_image.append", "image": b64(b"GIF89a-nope"), "event_id": "i1"}
        await send(ws, bad)
        err = await recv(ws)
        assert err["error"]["code"] == "invalid_image" and err["error"]["event_id"] == "i1"
        assert "cannot decode the image" in err["error"]["message"]
        await send(ws, {**bad, "image": b64(png((0, 0, 0))), "time_ms": "soon"})
        err = await recv(ws)
        assert err["error"]["code"] == "invalid_value" and err["error"]["param"] == "time_ms"
    assert (await asyncio.wait_for(good, TIMEOUT))["type"] == f"{TRANSCRIPT}.completed"


async def test_oversized_message_closes_1009(server: tuple[str, AppState]) -> None:
    """A frame over max_message_bytes closes that connection with 1009; others go on."""
    good = asyncio.create_task(transcribe_once(server[0]))
    async with connect(ws_url(server[0]), additional_headers=AUTH, max_size=None) as ws:
        await recv(ws)
        big = {"type": "input_audio_buffer.append", "audio": "A" * (MAX_MESSAGE + 4)}
        await send(ws, big)
        with pytest.raises(ConnectionClosed) as info:
            for _ in range(5):
                await recv(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert (await asyncio.wait_for(good, TIMEOUT))["type"] == f"{TRANSCRIPT}.completed"


async def test_wrong_key_and_origin_are_refused(server: tuple[str, AppState]) -> None:
    """A wrong or missing API key is refused at the upgrade with HTTP 401, a foreign browser
    origin with 403, each with a JSON error body; a concurrent session is unaffected."""
    good = asyncio.create_task(transcribe_once(server[0]))
    cases = [
        ({"Authorization": "Bearer nope"}, 401, "invalid API key"),
        ({}, 401, "missing API key"),
        ({**AUTH, "Origin": "https://evil.example"}, 403, "not allowed"),
    ]
    for headers, status, message in cases:
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(server[0]), additional_headers=headers):
                pass
        resp = info.value.response
        assert resp.status_code == status
        assert message in json.loads(resp.body or b"{}")["error"]["message"]
    client = AsyncOpenAI(base_url=server[0] + "/v1", api_key="nope")
    with pytest.raises(InvalidStatus):
        async with client.realtime.connect():
            pass
    assert (await asyncio.wait_for(good, TIMEOUT))["type"] == f"{TRANSCRIPT}.completed"


async def test_session_limit_error_then_close(model: Gemma4Unified) -> None:
    """When every session slot is taken, a new connection gets session_limit_reached and a
    1013 close; the open session still gets its transcript."""
    engine = Engine(model, EngineConfig(max_sessions=1))
    app = create_app(ServerSettings(vad=False, extra=TUNING), engine=engine)
    with serve(app) as base:
        async with connect(ws_url(base)) as first:
            created = await recv(first)
            assert created["session"]["audio"]["input"]["turn_detection"] is None  # no VAD
            async with connect(ws_url(base)) as second:
                err = await recv(second)
                assert err["type"] == "error"
                assert err["error"]["code"] == "session_limit_reached"
                assert "slots" in err["error"]["message"]
                with pytest.raises(ConnectionClosed) as info:
                    await recv(second)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1013
            await send(first, {"type": "input_audio_buffer.append", "audio": b64(CLIP24)})
            await send(first, {"type": "input_audio_buffer.commit"})
            await recv_until(first, f"{TRANSCRIPT}.completed")


class StuckSocket:
    """A WebSocket whose client never reads: the first send never completes, as when the
    client's receive window and the server's buffers are full. Incoming frames are given."""

    def __init__(self, frames: list[str]) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for f in frames:
            self.inbox.put_nowait({"type": "websocket.receive", "text": f})
        self.sends = 0
        self.closed: tuple[int, str] | None = None

    async def send_text(self, text: str) -> None:
        self.sends += 1
        await asyncio.Event().wait()

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)


async def test_client_that_stops_reading_is_cut_off(model: Gemma4Unified) -> None:
    """A client that sends but never reads cannot grow the server's memory: past the unsent
    bound its session ends and the socket closes with 1008; another session is served."""
    engine = Engine(model, EngineConfig(max_sessions=2))
    await engine.start()
    try:
        other = await engine.open_session(SessionConfig(vad=None))
        handle = await engine.open_session(SessionConfig(vad=None))
        ws = StuckSocket(["not json"] * 500)  # each one earns an error event
        conn = Connection(ws, handle, RealtimeProtocol(), MAX_MESSAGE)  # type: ignore[arg-type]
        conn.max_unsent = 64
        reason = await asyncio.wait_for(conn.run(), TIMEOUT)
        assert reason == "stalled"
        assert ws.closed == (1008, "client not reading events")
        assert conn.out.qsize() <= 64
        assert handle.closed
        assert ws.inbox.qsize() > 0  # cut off before it read every frame
        await asyncio.wait_for(_until(lambda: engine.active_sessions == 1), TIMEOUT)
        other.push_audio(np.zeros(16_000, np.float32), 16_000)
        other.flush()
        assert not other.closed
    finally:
        await engine.stop()


async def _until(cond: Any, step: float = 0.05) -> None:
    # Polls the engine thread's state: there is no event to wait on.
    while not cond():  # noqa: ASYNC110
        await asyncio.sleep(step)


# --- rawcast extensions -------------------------------------------------------------------------


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(buf, format="PNG")
    return buf.getvalue()


async def test_translation_and_captions(server: tuple[str, AppState]) -> None:
    """session.rawcast turns on translation and captions: the item gets
    rawcast.translation.completed (same item_id, language, times) next to its transcript, and
    an image becomes rawcast.caption.completed at its media time; rawcast.session.close ends
    the session after the final events with rawcast.session.closed and a 1000 close."""
    async with connect(ws_url(server[0]), additional_headers=AUTH) as ws:
        await recv(ws)
        session = {
            "type": "transcription",
            "audio": {"input": {"turn_detection": None}},
            "rawcast": {"translate": "Spanish", "captions": True},
        }
        await send(ws, {"type": "session.update", "session": session})
        upd = await recv(ws)
        assert upd["session"]["rawcast"] == {"translate": "Spanish", "captions": True}
        await send(ws, {"type": "rawcast.input_image.append", "image": b64(png((200, 20, 20))),
                        "time_ms": 500})  # fmt: skip
        await send(ws, {"type": "input_audio_buffer.append", "audio": b64(CLIP24)})
        await send(ws, {"type": "input_audio_buffer.commit"})
        await send(ws, {"type": "rawcast.session.close"})
        events = await recv_until(ws, "rawcast.session.closed")
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1000
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e)
    (done,) = by_type[f"{TRANSCRIPT}.completed"]
    (tr,) = by_type["rawcast.translation.completed"]
    assert tr["item_id"] == done["item_id"]
    assert tr["language"] == "Spanish" and isinstance(tr["text"], str)
    assert tr["start_ms"] == done["rawcast"]["start_ms"] and tr["end_ms"] > tr["start_ms"]
    (cap,) = by_type["rawcast.caption.completed"]
    assert cap["start_ms"] == cap["end_ms"] == 500
    assert isinstance(cap["text"], str) and cap["item_id"]
    for e in by_type.get("rawcast.translation.delta", []):
        assert e["item_id"] == done["item_id"] and isinstance(e["delta"], str)


# --- load ---------------------------------------------------------------------------------------

LOAD_CLIENTS = 20
LOAD_SECONDS = 60.0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def release_memory() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def live_session_objects() -> int:
    kinds = {SessionHandle, Session, RealtimeProtocol, Connection}
    gc.collect()  # garbage cycles an earlier test left are not live
    return sum(type(o) in kinds for o in gc.get_objects())  # type(): weak proxies are fine


async def paced_client(base: str, utterance: npt.NDArray[np.int16], count: int) -> list[str]:
    """Stream ``count`` utterances in real time (100 ms appends); return their completed ids."""
    done: list[str] = []
    errors: list[dict[str, Any]] = []
    async with connect(ws_url(base), additional_headers=AUTH) as ws:

        async def read() -> None:
            while len(done) < count:
                ev = json.loads(await ws.recv())
                if ev["type"] == f"{TRANSCRIPT}.completed":
                    done.append(ev["item_id"])
                elif ev["type"] in ("error", f"{TRANSCRIPT}.failed"):
                    errors.append(ev)

        reader = asyncio.create_task(read())
        audio = np.tile(utterance, count)
        chunk = 2400
        t0 = time.monotonic()
        try:
            for k, i in enumerate(range(0, audio.size, chunk)):
                await asyncio.sleep(max(0.0, t0 + k * chunk / 24000 - time.monotonic()))
                append = {"type": "input_audio_buffer.append", "audio": b64(audio[i : i + chunk])}
                await send(ws, append)
            await asyncio.wait_for(reader, TIMEOUT)
        finally:
            reader.cancel()
    assert not errors, errors[:3]
    return done


async def settle(engine: Engine, st: AppState, wait: float = 30.0) -> None:
    """Wait until every session is closed and released (the engine runs on its thread)."""
    deadline = time.monotonic() + wait
    # Polls the engine thread's state: there is no event to wait on.
    while (engine.active_sessions or st.sessions) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_load_20_clients_real_time(model: Gemma4Unified, vad: SileroModel) -> None:
    """20 clients stream a speech/silence loop in real time for 60 s each: every utterance of
    every client gets its completed event (no errors, nothing dropped); afterwards no session
    state is left (no live session objects, engine.active_sessions == 0) and the process RSS
    is back within 64 MiB of its level before the load."""
    engine = Engine(
        model,
        EngineConfig(
            max_sessions=LOAD_CLIENTS, max_segment_s=8.0, max_images_per_segment=1,
            max_image_tokens=70,
        ),
        vad_model=vad,
    )  # fmt: skip
    tuning = {"realtime.decode_interval_ms": "60000", "realtime.max_new_tokens": "2"}
    app = create_app(ServerSettings(api_keys=(KEY,), extra=tuning), engine=engine)
    st: AppState = app.state.rawcast
    speech = CLIP24[: 24000 * 3 // 4]
    utterance = np.concatenate([speech, np.zeros(24000 * 17 // 4, np.int16)])  # 5 s
    count = int(LOAD_SECONDS * 24000 // utterance.size)
    with serve(app) as base:
        assert len(await paced_client(base, utterance, 1)) == 1  # warm-up
        await settle(engine, st)
        objects = live_session_objects()
        baseline = release_memory()
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(paced_client(base, utterance, count) for _ in range(LOAD_CLIENTS))
        )
        elapsed = time.monotonic() - t0
        await settle(engine, st)
        assert engine.active_sessions == 0 and not st.sessions
        assert not engine.core.sessions
        assert live_session_objects() == objects
        grown = release_memory() - baseline
    assert elapsed < LOAD_SECONDS + TIMEOUT
    for ids in results:
        assert len(ids) == count and len(set(ids)) == count
    assert len({i for ids in results for i in ids}) == count * LOAD_CLIENTS
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"


# --- the protocol core, without I/O ---------------------------------------------------------------


def test_core_items_follow_segments_and_finish_in_order() -> None:
    """Engine events map to one item per segment by start sample; text of a segment cleared
    before it was committed is dropped; a committed item whose text never comes gets
    ``failed`` when a later item completes, so every committed item ends."""
    from rawcast.pipeline.media import SpeechEvent, TextEvent

    core = RealtimeProtocol()
    core.receive(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))

    def sent(outs: list[Any]) -> list[dict[str, Any]]:
        return [o.event for o in outs if hasattr(o, "event")]

    a = sent(core.engine_event(SpeechEvent("started", 16000)))[0]
    assert a["audio_start_ms"] == 1000
    stop = sent(core.engine_event(SpeechEvent("stopped", 48000)))
    assert [e["type"] for e in stop] == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    b = sent(core.engine_event(SpeechEvent("started", 64000)))[0]  # cleared: never stopped
    c = sent(core.engine_event(SpeechEvent("started", 96000)))[0]
    assert not sent(core.engine_event(TextEvent("transcribe", "x", 64000, 80000, False, 2)))
    core.engine_event(SpeechEvent("stopped", 112000))
    out = sent(core.engine_event(TextEvent("transcribe", "hi", 96000, 112000, True, 3)))
    assert [(e["type"].rsplit(".", 1)[-1], e["item_id"]) for e in out] == [
        ("failed", a["item_id"]),
        ("completed", c["item_id"]),
    ]
    assert out[1]["usage"] == {"type": "duration", "seconds": 1.0}
    assert b["item_id"] not in {e["item_id"] for e in out}
    for e in out:
        strict(e)


@pytest.mark.parametrize("stop_first", [False, True])
def test_core_text_after_an_engine_cut_gets_its_own_item(stop_first: bool) -> None:
    """A segment cut by the engine (slot full) goes on in a fresh segment without speech
    events; its text becomes a new committed and completed item instead of being dropped
    as a duplicate of the first part's, whether the real speech_stopped comes before
    (fast upload) or after (live) the cut."""
    from rawcast.pipeline.media import SpeechEvent, TextEvent

    core = RealtimeProtocol()
    core.receive(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))

    def sent(outs: list[Any]) -> list[dict[str, Any]]:
        return [o.event for o in outs if hasattr(o, "event")]

    a = sent(core.engine_event(SpeechEvent("started", 0)))[0]["item_id"]
    events: list[dict[str, Any]] = []
    if stop_first:
        events += sent(core.engine_event(SpeechEvent("stopped", 560000)))
    events += sent(core.engine_event(TextEvent("transcribe", "one two", 0, 448000, True, 0)))
    events += sent(core.engine_event(TextEvent("transcribe", "thr", 448000, 480000, False, 1)))
    if not stop_first:
        events += sent(core.engine_event(SpeechEvent("stopped", 560000)))
    events += sent(core.engine_event(TextEvent("transcribe", "three", 448000, 560000, True, 1)))
    kinds = [(e["type"].rsplit(".", 1)[-1], e.get("item_id")) for e in events]
    done = [(e["item_id"], e["transcript"]) for e in events if e["type"].endswith("completed")]
    assert done[0] == (a, "one two")
    assert done[1][1] == "three" and done[1][0] != a
    b = done[1][0]
    assert [k for k in kinds if k[0] == "committed"] == [("committed", a), ("committed", b)]
    assert ("delta", b) in kinds
    committed_b = next(e for e in events if e["type"].endswith("committed") and e["item_id"] == b)
    assert committed_b["previous_item_id"] == a
    for e in events:
        strict(e)
