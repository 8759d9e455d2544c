"""SIGTERM drains: readiness drops at once, new sessions are refused, open sessions get
their final text and a proper close before the process exits."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

RAWCAST = str(Path(sys.executable).with_name("rawcast"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:  # not listening (yet, or any more)
        return 0


def _pcm24() -> bytes:
    from tiny_model import fixture_pcm

    x = np.concatenate([np.zeros(8000, np.float32), fixture_pcm()])
    frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16).reshape(1, -1), "s16", "mono")
    frame.sample_rate = 16000
    rs = av.AudioResampler(format="s16", layout="mono", rate=24000)
    out = [*rs.resample(frame), *rs.resample(None)]
    return b"".join(f.to_ndarray().tobytes() for f in out)


@pytest.fixture
def server(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    from tiny_model import tiny_model

    from rawcast.model.loader import save

    ckpt = save(tiny_model(), tmp_path / "ckpt")
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [RAWCAST, "--log-format", "json", "serve", "--port", str(port), "--model", str(ckpt),
         "--drain-timeout", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    base = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while _status(f"http://{base}/readyz") != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not become ready")
        time.sleep(0.2)
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


async def test_sigterm_finalises_open_sessions(server: tuple[subprocess.Popen[bytes], str]) -> None:
    """An open WebSocket session gets its completed transcript and a normal close after
    SIGTERM; meanwhile /readyz is 503 and a new session is refused; then the process exits."""
    proc, base = server
    url = f"ws://{base}/v1/realtime?intent=transcription"
    async with connect(url, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        update = {"type": "session.update", "session": {"type": "transcription",
                  "audio": {"input": {"turn_detection": None}}}}  # fmt: skip
        await ws.send(json.dumps(update))
        assert json.loads(await ws.recv())["type"] == "session.updated"
        audio = base64.b64encode(_pcm24()).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while await asyncio.to_thread(_status, f"http://{base}/readyz") != 503:
            assert time.monotonic() - t0 < 2.0, "readiness did not drop at once"
            await asyncio.sleep(0.05)
        kinds = []
        async with connect(url, max_size=None) as late:
            with contextlib.suppress(ConnectionClosed):
                async for m in late:
                    kinds.append(json.loads(m)["type"])
        assert kinds == ["error"]
        assert late.close_code == 1013
        types = []
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                types.append(json.loads(message)["type"])
        assert "conversation.item.input_audio_transcription.completed" in types
        assert ws.close_code in (1000, 1001)
    assert await asyncio.to_thread(proc.wait, 60) in (0, -signal.SIGTERM)
