"""`rawcast stream FILE --url ...` against an in-process server over loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from server_helpers import serve
from tiny_model import FIXTURES, fixture_pcm, tiny_model

from rawcast.pipeline.engine import Engine, EngineConfig
from rawcast.pipeline.vad import SileroModel
from rawcast.transports.app import create_app
from rawcast.transports.cli import main
from rawcast.transports.settings import ServerSettings

KEY = "cli-key"
WAV = FIXTURES / "fox-espeak-en-us.wav"
TUNING = {"realtime.decode_interval_ms": "1200", "realtime.max_new_tokens": "6"}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    engine = Engine(tiny_model(), EngineConfig(max_sessions=4), vad_model=SileroModel())
    app = create_app(ServerSettings(api_keys=(KEY,), extra=TUNING), engine=engine)
    with serve(app) as base:
        yield base.replace("http://", "ws://") + "/v1/realtime"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], list[str]]:
    code = main(["--log-level", "error", "stream", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), [x for x in err.splitlines() if x.strip()]


def make_video(path: Path) -> None:
    """The fixture speech as AAC with a few synthetic 64x48 frames (1 fps) in ``path``."""
    pcm = (fixture_pcm() * 32767).astype(np.int16)
    with av.open(str(path), "w") as c:
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        v = c.add_stream("mpeg4", rate=1)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        for i in range(4):
            img = np.zeros((48, 64, 3), np.uint8)
            img[:, : 16 * (i + 1)] = (220, 40, 40)
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, 1)
            c.mux(v.encode(vf))
        c.mux(v.encode(None))
        for i in range(0, pcm.size, 1024):
            f = av.AudioFrame.from_ndarray(pcm[None, i : i + 1024], format="s16", layout="mono")
            f.sample_rate, f.pts = 16000, i
            c.mux(a.encode(f))
        c.mux(a.encode(None))


def test_stream_wav_prints_final_transcript(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Streaming the fixture WAV in real time prints one final transcript line with its
    media times and exits 0 after the server's final events."""
    code, out, err = run([str(WAV), "--url", url, "--api-key", KEY], capsys)
    assert code == 0, err
    assert not err
    assert len(out) == 1 and out[0].startswith("[00:00:0"), out
    start, end = out[0][1:].split("]")[0].split(" --> ")
    assert start < end


def test_stream_video_json_with_captions_and_translation(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A generated mp4 (speech + synthetic frames) with --captions --translate --format json
    prints every server event as one JSON line: a transcript, a translation of the same item,
    captions of the frames, and rawcast.session.closed last."""
    video = tmp_path / "clip.mp4"
    make_video(video)
    argv = [str(video), "--url", url, "--api-key", KEY, "--captions", "--translate", "Spanish"]
    code, out, err = run([*argv, "--format", "json", "--speed", "2"], capsys)
    assert code == 0, err
    events = [json.loads(line) for line in out]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session.created" and kinds[-1] == "rawcast.session.closed"
    assert "error" not in kinds, events
    done = [e for e in events if e["type"].endswith("transcription.completed")]
    tr = [e for e in events if e["type"] == "rawcast.translation.completed"]
    assert done and {e["item_id"] for e in tr} == {e["item_id"] for e in done}
    caps = [e for e in events if e["type"] == "rawcast.caption.completed"]
    assert caps and caps[0]["start_ms"] == 0


def test_stream_errors_exit_nonzero_with_one_line(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file, an unreadable file, a file without audio, a refused connection and a
    wrong API key each exit non-zero with one clear line on stderr."""
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a media file" * 10)
    silent = tmp_path / "frames.mp4"
    with av.open(str(silent), "w") as c:
        v = c.add_stream("mpeg4", rate=1)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        c.mux(v.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), "rgb24")))
        c.mux(v.encode(None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{s.getsockname()[1]}/v1/realtime"  # nothing listens
    cases = [
        ([str(tmp_path / "nope.wav"), "--url", url], 2, "no such file"),
        ([str(junk), "--url", url], 2, "cannot read"),
        ([str(silent), "--url", url], 2, "no audio stream"),
        ([str(WAV), "--url", dead, "--api-key", KEY], 3, "cannot connect"),
        ([str(WAV), "--url", url, "--api-key", "wrong"], 3, "HTTP 401"),
    ]
    for argv, want, text in cases:
        code, out, err = run(argv, capsys)
        assert code == want, (argv, err)
        assert len(err) == 1 and text in err[0] and err[0].startswith("rawcast stream: "), err
        assert not out


def test_serve_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every serve setting a deployment needs can come from the environment, flags win,
    and a malformed number is a one-line usage error (exit 2), not a traceback."""
    from rawcast.transports.cli import build_parser

    monkeypatch.setenv("RAWCAST_MAX_SESSIONS", "3")
    monkeypatch.setenv("RAWCAST_MAX_SESSIONS_PER_KEY", "2")
    monkeypatch.setenv("RAWCAST_DRAIN_TIMEOUT", "12.5")
    monkeypatch.setenv("RAWCAST_VAD", "0")
    monkeypatch.setenv("RAWCAST_THREADS", "1")
    args = build_parser().parse_args(["serve"])
    assert (args.max_sessions, args.max_sessions_per_key) == (3, 2)
    assert (args.drain_timeout, args.no_vad, args.threads) == (12.5, True, 1)
    assert build_parser().parse_args(["serve", "--max-sessions", "5"]).max_sessions == 5
    monkeypatch.setenv("RAWCAST_MAX_SESSIONS", "many")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve"])
    assert e.value.code == 2
