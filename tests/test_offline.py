"""Offline and edge commands: `rawcast transcribe`, `rawcast narrate`, and feeds.

The media files are made here with PyAV from the speech fixture: an mp3 (audio only),
a webm (VP8 + Opus) and an mp4 (H.264 + AAC) with a video whose colour changes every
second, and an mp4 with video only.
"""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import av
import numpy as np
import pytest
import srt
import webvtt
from tiny_model import fixture_pcm

from rawcast.model.loader import load
from rawcast.pipeline.engine import Engine, EngineCore
from rawcast.pipeline.media import TextEvent
from rawcast.pipeline.session import SessionConfig, Tasks
from rawcast.pipeline.vad import SileroModel
from rawcast.transports.cli import main
from rawcast.transports.transcribe import Transcript, _outputs, render, transcribe_file

VIDEO_S = 3.0


def write_media(path: Path, audio: str | None, video: str | None) -> Path:
    pcm = (fixture_pcm() * 32767).astype(np.int16)
    with av.open(str(path), "w") as c:
        v = c.add_stream(video, rate=10) if video is not None else None
        a = c.add_stream(audio, rate=48000 if audio == "libopus" else 16000) if audio else None
        if a is not None:
            a.layout = "mono"
        if v is not None:
            v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
            for i in range(int(VIDEO_S * 10)):
                img = np.zeros((64, 96, 3), np.uint8)
                img[:, :, (i // 10) % 3] = 200  # red, green, blue: one second each
                f = av.VideoFrame.from_ndarray(img, format="rgb24")
                f.pts = i
                for pk in v.encode(f):
                    c.mux(pk)
            for pk in v.encode():
                c.mux(pk)
        if a is not None:
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
            frame.sample_rate, frame.pts = 16000, 0
            ctx = a.codec_context
            rs = av.AudioResampler(format=ctx.format.name, layout="mono", rate=ctx.sample_rate)
            for f2 in rs.resample(frame) + rs.resample(None):
                for pk in a.encode(f2):
                    c.mux(pk)
            for pk in a.encode():
                c.mux(pk)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    bad = d / "broken.mp3"
    bad.write_bytes(b"this is not an mp3 file\n" * 20)
    return {
        "mp3": write_media(d / "speech.mp3", "libmp3lame", None),
        "webm": write_media(d / "clip.webm", "libopus", "libvpx"),
        "mp4": write_media(d / "clip.mp4", "aac", "libx264"),
        "silent_mp4": write_media(d / "video-only.mp4", None, "libx264"),
        "broken": bad,
    }


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load("rawcast-tiny")


@pytest.fixture(scope="module")
def vad() -> SileroModel:
    return SileroModel()


def _live_finals(model, vad, path: Path, tasks: Tasks) -> list[tuple[str, str, float, float]]:  # type: ignore[no-untyped-def]
    """The same file through the server's asyncio engine, in random chunks (a live stream)."""

    async def run() -> list[TextEvent]:
        engine = Engine(model, vad_model=vad)
        await engine.start()
        try:
            h = await engine.open_session(SessionConfig(tasks=tasks))
            rng = random.Random(7)
            with av.open(str(path)) as c:
                rs = av.AudioResampler(format="s16", layout="mono", rate=16000)
                pcm = np.concatenate(
                    [
                        f.to_ndarray().reshape(-1)
                        for fr in c.decode(audio=0)
                        for f in rs.resample(fr)
                    ]
                    + [f.to_ndarray().reshape(-1) for f in rs.resample(None)]
                )
            i = 0
            while i < pcm.size:
                n = rng.randint(100, 9000)
                h.push_audio(pcm[i : i + n], 16000)
                i += n
                await asyncio.sleep(0)
            h.close()
            return [e async for e in h.events() if isinstance(e, TextEvent) and e.final]
        finally:
            await engine.stop()

    evs = asyncio.run(run())
    return [(e.task, e.text.strip(), round(e.start, 3), round(e.end, 3)) for e in evs]


def _secs(stamp: str) -> float:
    h, m, sec = stamp.split(":")
    return round(int(h) * 3600 + int(m) * 60 + float(sec), 3)


def _as_finals(t: Transcript) -> list[tuple[str, str, float, float]]:
    out = []
    for s in t.segments:
        out.append(("transcribe", s.text, s.start, s.end))
        if s.translation is not None:
            out.append(("translate", s.translation, s.start, s.end))
    return out


def test_transcribe_mp3_equals_a_live_stream_and_renders_every_format(  # type: ignore[no-untyped-def]
    media: dict[str, Path],
    model,
    vad: SileroModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    core = EngineCore(model, vad_model=vad)
    t = transcribe_file(core, str(media["mp3"]), None, False)
    assert t.segments and all(s.text for s in t.segments)
    assert 3.0 < t.duration < 4.0
    assert all(0 <= s.start < s.end <= t.duration + 0.05 for s in t.segments)
    # the same engine, fed like a live stream in random chunks, gives the same text and times
    assert _as_finals(t) == _live_finals(model, vad, media["mp3"], Tasks())

    # every format; subtitles parse back with independent parsers
    cues = [(s.start, s.end, s.text) for s in t.segments]
    want = [(round(a, 3), round(b, 3), x) for a, b, x in cues]
    vtt = tmp_path / "speech.vtt"
    vtt.write_text(render(t, "vtt"))
    got = webvtt.read(str(vtt))  # type: ignore[no-untyped-call]
    assert [(_secs(c.start), _secs(c.end), c.text) for c in got] == want
    subs = list(srt.parse(render(t, "srt")))
    assert [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in subs] == want
    lines = render(t, "text").splitlines()
    assert len(lines) == len(cues)
    assert all(x in line for (_, _, x), line in zip(cues, lines, strict=True))
    # the CLI: to a file with -o, to stdout without
    out = tmp_path / "speech.json"
    assert main(["transcribe", str(media["mp3"]), "--format", "json", "-o", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [(s["start"], s["end"], s["text"]) for s in d["segments"]] == cues
    capsys.readouterr()
    assert main(["transcribe", str(media["mp3"]), "--format", "srt"]) == 0
    assert [s.content for s in srt.parse(capsys.readouterr().out)] == [x for _, _, x in cues]


def test_transcribe_webm_with_video_translation_and_captions(  # type: ignore[no-untyped-def]
    media: dict[str, Path], model, vad: SileroModel, tmp_path: Path
) -> None:
    core = EngineCore(model, vad_model=vad)
    t = transcribe_file(core, str(media["webm"]), "es", True)
    # the speech is transcribed and translated with the video's pictures in its segment
    assert t.segments and all(s.text and s.translation for s in t.segments)
    # one caption per 2 s cadence slot of the 3 s video, at the video's times
    assert [c.time for c in t.captions] == [0.0, 2.0]
    assert all(c.text for c in t.captions)
    vtt = render(t, "vtt")
    path = tmp_path / "clip.vtt"
    path.write_text(vtt)
    got = list(webvtt.read(str(path)))  # type: ignore[no-untyped-call]
    assert len(got) == len(t.segments) + len(t.captions)
    for s in t.segments:  # transcript and translation share a cue
        assert any(c.text == f"{s.text}\n{s.translation}" for c in got)
    assert sum(c.text.startswith("[") for c in got) == len(t.captions)
    subs = list(srt.parse(render(t, "srt")))
    assert [s.index for s in subs] == list(range(1, len(got) + 1))
    # several inputs: one output each in the -o directory, kept apart when stems collide
    files = [str(media["webm"]), str(media["mp4"])]
    names = [p.name for p in _outputs(files, str(tmp_path), "srt") if p is not None]
    assert names == ["clip.webm.srt", "clip.mp4.srt"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("missing", "no such file"),
        ("broken", "cannot read"),
        ("silent_mp4", "has no audio stream"),
    ],
)
def test_transcribe_bad_input_exits_with_one_clear_line(
    media: dict[str, Path], key: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(media[key]) if key in media else "/nonexistent/talk.wav"
    assert main(["transcribe", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("rawcast transcribe:")


# --- narrate -----------------------------------------------------------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        n = int(self.headers["Content-Length"])
        _Hook.got.append(json.loads(self.rfile.read(n)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    _Hook.got = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/hook"
    srv.shutdown()
    srv.server_close()


def _rawcast(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    cmd = [sys.executable, "-m", "rawcast.transports.cli", "--log-level", "warning", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_narrate_a_file_in_real_time_prints_and_posts_captions(
    media: dict[str, Path], webhook: str
) -> None:
    r = _rawcast(
        "narrate", str(media["mp4"]), "--realtime", "--interval", "1", "--webhook", webhook
    )
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    # live pacing: about one caption per second of video (a busy CPU may skip a frame)
    times = [e["time"] for e in events]
    assert times[0] == 0.0 and len(times) >= 2 and times == sorted(set(times))
    assert all(0.0 <= t < 3.0 for t in times)
    assert all(e["type"] == "caption" and e["text"] and e["source"] for e in events)
    assert _Hook.got == events  # the webhook received the same events, in order


@pytest.mark.parametrize(
    ("source", "code", "message"),
    [
        ("/nonexistent/cam.mp4", 2, "no such file"),
        ("rtsp://127.0.0.1:9/none", 1, "cannot open rtsp://127.0.0.1:9/none"),
    ],
)
def test_narrate_a_source_that_never_opens_is_one_clear_line(
    source: str, code: int, message: str
) -> None:
    r = _rawcast("narrate", source, timeout=60)
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_narrate_reconnects_a_dropped_live_source_with_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A live source that drops is reopened with growing delays until ``--retries`` runs out."""
    import time

    from rawcast.transports import narrate as n

    calls: list[float] = []

    def read(src: n.Source, audio: bool, stop: threading.Event) -> Iterator[n.Item]:
        calls.append(time.monotonic())
        if len(calls) > 1:
            raise n.NarrateError("connection refused")
        yield "video", None, 0.0  # the first connection works, then the camera goes away

    monkeypatch.setattr(n, "read", read)
    monkeypatch.setattr(n, "BACKOFF_START_S", 0.05)
    got: list[object] = []
    n.reader(n.Source("rtsp://camera.invalid/stream"), False, 3, threading.Event(), got.append)
    assert got[0] == ("video", None, 0.0)
    err = got[1]
    assert isinstance(err, n.NarrateError) and "gave up after 3 reconnects" in str(err)
    assert got[2] is None and len(got) == 3
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) == 4 and gaps[0] >= 0.05 and gaps[2] >= 3 * gaps[0]  # 0.05, 0.1, 0.2 s


# --- feeds ---------------------------------------------------------------------------------


def test_feeds_deliver_published_events_to_websocket_clients() -> None:
    from starlette.testclient import TestClient

    from rawcast.transports.app import create_app
    from rawcast.transports.settings import ServerSettings

    app = create_app(ServerSettings(api_keys=("k",)), engine=None)
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        r = client.post("/v1/feeds/cam1", json={"text": "nobody listens"}, headers=auth)
        assert r.status_code == 202 and r.json()["listeners"] == 0
        assert client.post("/v1/feeds/cam1", json={"a": 1}).status_code == 401
        assert client.post("/v1/feeds/cam1", content=b"[1, 2]", headers=auth).status_code == 400
        assert client.post("/v1/feeds/c@m", json={}, headers=auth).status_code == 400
        with client.websocket_connect("/v1/feeds/cam1?api_key=k") as ws:
            for i in range(3):
                r = client.post("/v1/feeds/cam1", json={"i": i}, headers=auth)
                assert r.json()["listeners"] == 1
            assert [json.loads(ws.receive_text())["i"] for _ in range(3)] == [0, 1, 2]
