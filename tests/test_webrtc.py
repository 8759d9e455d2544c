"""WebRTC ingest: aiortc peers against the in-process server over loopback (WHIP and calls)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import wave
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from server_helpers import serve
from starlette.applications import Starlette
from tiny_model import fixture_pcm, tiny_model

from rawcast.pipeline.engine import Engine, EngineConfig
from rawcast.pipeline.vad import SileroModel
from rawcast.transports.app import AppState, create_app
from rawcast.transports.settings import ServerSettings
from rawcast.transports.webrtc import calls_of, ice_servers, rtc_configuration, turn_credentials

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETED = "conversation.item.input_audio_transcription.completed"


# --- an in-process server on a free loopback port ---------------------------------------


@dataclass
class Server:
    url: str
    app: Starlette
    engine: Engine

    @property
    def state(self) -> AppState:
        st: AppState = self.app.state.rawcast
        return st

    def peer_connections(self) -> set[Any]:
        return calls_of(self.app).peer_connections


@contextlib.contextmanager
def run_server(settings: ServerSettings, engine: Engine) -> Iterator[Server]:
    """``create_app(settings, engine)`` served in-process on a free loopback port."""
    app = create_app(settings, engine=engine)
    with serve(app) as url:
        yield Server(url, app, engine)


def make_engine(max_sessions: int = 2) -> Engine:
    return Engine(tiny_model(), EngineConfig(max_sessions=max_sessions), vad_model=SileroModel())


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    settings = ServerSettings(api_keys=(KEY,), max_sessions=2)
    with run_server(settings, make_engine(2)) as srv:
        yield srv


# --- test media -------------------------------------------------------------------------


def speech_48k(lead_s: float = 0.5, tail_s: float = 1.5) -> np.ndarray:
    """The fixture speech with silence around it, as 48 kHz float32 mono."""
    pcm = fixture_pcm()
    pcm = np.concatenate([np.zeros(int(lead_s * 16000)), pcm, np.zeros(int(tail_s * 16000))])
    t = np.arange(pcm.size * 3) / 3.0
    return np.interp(t, np.arange(pcm.size), pcm).astype(np.float32)


def write_wav(path: Path, lead_s: float = 0.5, tail_s: float = 1.5) -> Path:
    """A 48 kHz stereo 16-bit WAV of the fixture speech (what Chrome's fake capture likes)."""
    s16 = (np.clip(speech_48k(lead_s, tail_s), -1, 1) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(np.repeat(s16, 2).tobytes())
    return path


def write_webm(path: Path) -> Path:
    """A short WebM: the fixture speech (Opus) and moving coloured squares (VP8, 10 fps)."""
    audio = speech_48k()
    seconds = audio.size / 48000
    with av.open(str(path), "w", format="webm") as out:
        v = out.add_stream("libvpx", rate=10)
        v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
        a = out.add_stream("libopus", rate=48000)
        a.layout = "mono"
        for i in range(int(seconds * 10)):
            img = np.zeros((64, 96, 3), np.uint8)
            img[:, :] = (20, 20, 60)
            x = (i * 4) % 64
            img[16:48, x : x + 32] = (220, 40, 40)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, 10)
            for p in v.encode(frame):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        for i in range(0, audio.size, 960):
            chunk = audio[i : i + 960]
            chunk = np.pad(chunk, (0, 960 - chunk.size))
            af = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
            af.sample_rate = 48000
            af.pts = i
            for p in a.encode(af):
                out.mux(p)
        for p in a.encode():
            out.mux(p)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    return {"wav": write_wav(d / "speech.wav"), "webm": write_webm(d / "clip.webm")}


# --- a client peer ----------------------------------------------------------------------


class Peer:
    """An aiortc client: a media player's tracks out, the oai-events channel in."""

    def __init__(self, source: Path | None = None, label: str = "oai-events") -> None:
        self.pc = RTCPeerConnection()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.channel: Any = None
        self.player = MediaPlayer(str(source)) if source is not None else None
        if self.player is not None:
            for track in (self.player.audio, self.player.video):
                if track is not None:
                    self.pc.addTrack(track)
        else:
            self.pc.addTransceiver("audio", direction="sendonly")
        self._listen(self.pc.createDataChannel(label))
        self.pc.on("datachannel", self._listen)  # the server's, when ours is not oai-events

    def _listen(self, ch: Any) -> None:
        if ch.label == "oai-events":
            self.channel = ch
            ch.on("message", lambda m: self.events.put_nowait(json.loads(m)))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

    async def until(self, *types: str, limit_s: float = 45) -> list[dict[str, Any]]:
        """Events received until every type in ``types`` was seen."""
        seen: list[dict[str, Any]] = []
        missing = set(types)
        async with asyncio.timeout(limit_s):
            while missing:
                ev = await self.events.get()
                seen.append(ev)
                missing.discard(ev["type"])
        return seen

    async def close(self) -> None:
        if self.player is not None:
            for track in (self.player.audio, self.player.video):
                if track is not None:
                    track.stop()
        await self.pc.close()


@pytest.fixture
async def peers() -> AsyncIterator[Callable[..., Peer]]:
    """Makes client peers, and closes them whatever the test's outcome."""
    made: list[Peer] = []

    def make(*args: Any, **kw: Any) -> Peer:
        made.append(Peer(*args, **kw))
        return made[-1]

    yield make
    for peer in made:
        await peer.close()


async def _post_offer(client: httpx.AsyncClient, path: str, sdp: str, **kw: Any) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "application/sdp", **kw.pop("headers", {})}
    return await client.post(path, content=sdp, headers=headers, **kw)


async def _wait_freed(server: Server, limit_s: float = 15) -> None:
    deadline = time.monotonic() + limit_s
    while server.engine.active_sessions or server.peer_connections() or server.state.sessions:
        assert time.monotonic() < deadline, "the server did not free the session"
        await asyncio.sleep(0.05)


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# --- tests ------------------------------------------------------------------------------


async def test_whip_session_streams_a_wav_and_delete_frees_it(
    server: Server, media: dict[str, Path], peers: Callable[..., Peer]
) -> None:
    """A WHIP client sending a WAV gets 201 with an SDP answer and a Location; on the
    oai-events channel it receives session.created, speech started/stopped, committed, a
    transcription and (asked with ?translate=) a translation; DELETE on the Location ends
    the session and frees the peer connection and the engine slot."""
    peer = peers(media["wav"])
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await _post_offer(client, "/v1/whip?translate=Spanish", await peer.offer())
        assert r.status_code == 201, r.text
        assert r.headers["content-type"].startswith("application/sdp")
        location = r.headers["location"]
        assert re.fullmatch(r"/v1/whip/whip_[0-9a-f]+", location)
        await peer.accept(r.text)
        events = await peer.until(COMPLETED, "rawcast.translation.completed")
        types = _types(events)
        assert types[0] == "session.created"
        assert events[0]["session"]["rawcast"]["translate"] == "Spanish"
        for t in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                  "input_audio_buffer.committed"):  # fmt: skip
            assert t in types
        done = next(e for e in events if e["type"] == COMPLETED)
        started = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
        assert done["item_id"] == started["item_id"]
        assert done["usage"]["type"] == "duration" and done["usage"]["seconds"] > 0
        assert isinstance(done["transcript"], str)
        assert len(server.peer_connections()) == 1 and server.engine.active_sessions == 1

        r = await client.delete(location, headers=AUTH)
        assert r.status_code == 200
        assert not server.peer_connections()
        await _wait_freed(server)
        r = await client.delete(location, headers=AUTH)
        assert r.status_code == 404


async def test_realtime_calls_multipart_with_video_gives_captions_and_close_frees(
    server: Server, media: dict[str, Path], peers: Callable[..., Peer]
) -> None:
    """OpenAI's WebRTC shape: a multipart offer (sdp + session JSON asking for captions)
    with audio and video from a WebM gets 201, the answer and a Location; the data channel
    carries speech, transcription and scene-caption events; closing the client's peer
    connection ends the session on the server."""
    peer = peers(media["webm"])
    session = {"type": "transcription", "rawcast": {"captions": True}}
    files = {
        "sdp": (None, await peer.offer(), "application/sdp"),
        "session": (None, json.dumps(session), "application/json"),
    }
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await client.post("/v1/realtime/calls", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.headers["location"].startswith("/v1/realtime/calls/rtc_")
    await peer.accept(r.text)
    events = await peer.until(COMPLETED, "rawcast.caption.completed")
    caption = next(e for e in events if e["type"] == "rawcast.caption.completed")
    assert {"item_id", "text", "start_ms", "end_ms"} <= caption.keys()
    assert "input_audio_buffer.speech_started" in _types(events)
    await peer.close()
    await _wait_freed(server)


async def test_server_opens_oai_events_and_takes_session_updates(
    server: Server, peers: Callable[..., Peer]
) -> None:
    """A client whose offer has a data channel, but not one named oai-events, gets an
    oai-events channel opened by the server, with session.created on it; a session.update
    sent on it changes the translation language and is answered with session.updated."""
    peer = peers(label="chat")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        r = await _post_offer(client, "/v1/realtime/calls", await peer.offer())
        assert r.status_code == 201, r.text
        await peer.accept(r.text)
        (created,) = await peer.until("session.created", limit_s=20)
        assert created["session"]["rawcast"]["translate"] is None
        update = {"type": "transcription", "rawcast": {"translate": "German"}}
        peer.channel.send(json.dumps({"type": "session.update", "session": update}))
        events = await peer.until("session.updated", limit_s=20)
        assert events[-1]["session"]["rawcast"]["translate"] == "German"
        assert (await client.delete(r.headers["location"], headers=AUTH)).status_code == 200
    await _wait_freed(server)


def _codec_only(sdp: str, kind: str, codec: str) -> str:
    """Rewrite the ``kind`` media section of an offer to offer only ``codec``."""
    head, *sections = re.split(r"(?m)^(?=m=)", sdp)
    out = [head]
    for sec in sections:
        if sec.startswith(f"m={kind} "):
            lines = sec.splitlines()
            m = lines[0].split()
            lines[0] = " ".join([*m[:3], "120"])
            lines = [x for x in lines if not x.startswith(("a=rtpmap", "a=fmtp", "a=rtcp-fb"))]
            lines.insert(1, f"a=rtpmap:120 {codec}")
            sec = "\r\n".join(lines) + "\r\n"
        out.append(sec)
    return "".join(out)


async def _offer_sdp(*kinds: str) -> str:
    pc = RTCPeerConnection()
    for kind in kinds:
        pc.addTransceiver(kind, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


async def test_bad_offers_get_4xx_with_a_message_and_the_server_goes_on(server: Server) -> None:
    """Each bad request gets its 4xx with a one-line message: not SDP, too big, wrong content type,
    no audio, unsupported audio or video codec, wrong key, foreign origin, full server,
    draining server; a good offer afterwards still gets 201."""
    audio_video = await _offer_sdp("audio", "video")
    audio = await _offer_sdp("audio")
    video = await _offer_sdp("video")
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/v1/whip", {"content": "hello"}, 400, "not an SDP offer"),
        ("/v1/whip", {"content": "v=0\r\n" + "a=x\r\n" * 20_000}, 413, "larger than"),
        ("/v1/whip", {"content": audio, "headers": {"Content-Type": "text/plain"}}, 415,
         "Content-Type"),
        ("/v1/realtime/calls", {"content": json.dumps({"sdp": audio}),
          "headers": {"Content-Type": "application/json"}}, 415, "multipart/form-data"),
        ("/v1/whip", {"content": video}, 422, "no audio track"),
        ("/v1/whip", {"content": _codec_only(video, "video", "AV1/90000")}, 422, "no audio"),
        ("/v1/whip", {"content": _codec_only(audio, "audio", "ISAC/16000")}, 422,
         "no supported audio codec"),
        ("/v1/whip", {"content": _codec_only(audio_video, "video", "AV1/90000")}, 422,
         "no supported video codec"),
        ("/v1/whip?translate=1$", {"content": audio}, 400, "language name"),
        ("/v1/whip", {"content": audio, "headers": {"Authorization": "Bearer nope"}}, 401,
         "invalid API key"),
        ("/v1/whip", {"content": audio, "headers": {"Origin": "http://evil.example"}}, 403,
         "not allowed"),
    ]  # fmt: skip
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for path, kw, status, words in cases:
            r = await _post_offer(client, path, kw.pop("content", ""), **kw)
            assert r.status_code == status, (path, r.text)
            message = r.json()["error"]["message"]
            assert words in message and "\n" not in message

        # full: both engine slots taken by signalled-only sessions
        held = []
        for _ in range(2):
            r = await _post_offer(client, "/v1/whip", audio)
            assert r.status_code == 201
            held.append(r.headers["location"])
        r = await _post_offer(client, "/v1/whip", audio)
        assert r.status_code == 503 and r.headers["retry-after"].isdigit()
        assert "slots" in r.json()["error"]["message"]
        for location in held:
            assert (await client.delete(location, headers=AUTH)).status_code == 200
        await _wait_freed(server)

        server.state.draining = True
        try:
            r = await _post_offer(client, "/v1/whip", audio)
        finally:
            server.state.draining = False
        assert r.status_code == 503 and "draining" in r.json()["error"]["message"]

        r = await _post_offer(client, "/v1/whip", audio)
        assert r.status_code == 201 and r.text.startswith("v=0")
        assert (await client.delete(r.headers["location"], headers=AUTH)).status_code == 200
    await _wait_freed(server)


def test_a_turn_secret_mints_expiring_credentials_per_client() -> None:
    """``--turn-secret``: each call gets a username ``<expiry>:<user>`` and the base64
    HMAC-SHA1 of it under the secret (what coturn's use-auth-secret checks), on TURN
    URLs only; the page's config, the WHIP Link headers and the server's own peer all
    take them from ``ice_servers``."""
    import base64
    import hashlib
    import hmac

    settings = ServerSettings(
        ice_servers=("stun:stun.example.org:3478", "turns:turn.example.org:5349"),
        turn_secret="s3cret", turn_ttl_s=600,
    )  # fmt: skip
    stun, turn = ice_servers(settings, now=1_800_000_000)
    assert stun == {"urls": ["stun:stun.example.org:3478"]}
    assert turn["username"] == "1800000600:rawcast"
    want = hmac.new(b"s3cret", b"1800000600:rawcast", hashlib.sha1).digest()
    assert base64.b64decode(turn["credential"]) == want
    assert turn_credentials("s3cret", "rawcast", 600, now=1_800_000_000) == (
        turn["username"], turn["credential"],
    )  # fmt: skip
    later = ice_servers(settings, now=1_800_000_100)[1]
    assert later["username"] == "1800000700:rawcast" and later["credential"] != turn["credential"]
    named = ServerSettings(ice_servers=settings.ice_servers, turn_secret="s3cret",
                           turn_username="alice")  # fmt: skip
    assert ice_servers(named)[1]["username"].endswith(":alice")
    peer = rtc_configuration(settings).iceServers[1]
    expiry, user = peer.username.split(":")
    assert user == "rawcast" and 0 < int(expiry) - time.time() <= 600


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--turn-secret", "a", "--turn-credential", "b"], "--turn-secret or --turn-credential"),
        (["--turn-secret", "a", "--turn-ttl", "0"], "--turn-ttl must be"),
    ],
)
def test_contradictory_turn_flags_exit_2_in_one_line(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rawcast.transports.cli import main

    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


async def test_options_advertises_ice_servers_and_patch_trickles(server: Server) -> None:
    """OPTIONS names the methods; ICE servers from the settings come as RFC 9725 Link
    headers (credentials on TURN only) and go to the server's peer connections; PATCH
    with a trickle-ICE fragment is accepted (204), with another content type it is 415."""
    from starlette.testclient import TestClient

    settings = ServerSettings(
        ice_servers=("stun:stun.example.org:3478", "turn:turn.example.org:3478"),
        turn_username="user",
        turn_credential="pass",
    )
    turn = rtc_configuration(settings).iceServers[1]  # what the server's own peer uses
    assert turn.urls == ["turn:turn.example.org:3478"]
    assert (turn.username, turn.credential) == ("user", "pass")
    client = TestClient(create_app(settings))  # not entered: no lifespan, no model load
    r = client.options("/v1/whip")
    assert r.status_code == 204 and "POST" in r.headers["allow"]
    links = r.headers.get_list("link")
    assert links == [
        '<stun:stun.example.org:3478>; rel="ice-server"',
        '<turn:turn.example.org:3478>; rel="ice-server"; username="user"; '
        'credential="pass"; credential-type="password"',
    ]

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        r = await _post_offer(http, "/v1/whip", await _offer_sdp("audio"))
        location = r.headers["location"]
        frag = "a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
        headers = {**AUTH, "Content-Type": "application/trickle-ice-sdpfrag"}
        r = await http.patch(location, content=frag, headers=headers)
        assert r.status_code == 204, r.text
        r = await http.patch(location, content=frag, headers={**AUTH, "Content-Type": "text/x"})
        assert r.status_code == 415
        assert (await http.delete(location, headers=AUTH)).status_code == 200
    await _wait_freed(server)
