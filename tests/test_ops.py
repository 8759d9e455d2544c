"""Operations endpoints: health, readiness with capacity, Prometheus metrics, API keys."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from server_helpers import serve
from tiny_model import tiny_model
from websockets.sync.client import connect

from rawcast.pipeline.engine import Engine, EngineConfig
from rawcast.transports.app import create_app
from rawcast.transports.settings import ServerSettings


def test_health_readiness_metrics_and_keys() -> None:
    """/healthz is open; /readyz reports capacity; /metrics needs the key and exposes the
    engine's step, batch and session metrics once work has run."""
    engine = Engine(tiny_model(), EngineConfig(max_sessions=2))
    app = create_app(ServerSettings(max_sessions=2, api_keys=("k1",), vad=False), engine=engine)
    with serve(app) as base:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{base}/readyz").json()
        assert ready["ready"] is True and ready["capacity_left"] == 2
        assert httpx.get(f"{base}/metrics").status_code == 401
        bad = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and "invalid API key" in bad.text
        ws_url = base.replace("http", "ws") + "/v1/realtime?api_key=k1"
        pcm = (0.1 * 32767 * np.sin(np.arange(24000) / 7)).astype(np.int16).tobytes()
        with connect(ws_url) as ws:
            ws.recv()  # session.created
            update = {"type": "session.update", "session": {"type": "transcription",
                      "audio": {"input": {"turn_detection": None}}}}  # fmt: skip
            ws.send(json.dumps(update))
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(pcm).decode()}))  # fmt: skip
            ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while json.loads(ws.recv())["type"] != (
                "conversation.item.input_audio_transcription.completed"
            ):
                pass
        text = ""
        for _ in range(200):  # the worker thread runs the ticks
            text = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer k1"}).text
            if "rawcast_step_seconds_count" in text and " 0.0" not in _line(text):
                break
        assert "rawcast_active_sessions" in text
        assert "rawcast_batch_rows_bucket" in text
        assert float(_line(text).split()[-1]) > 0


def _line(text: str) -> str:
    return next(x for x in text.splitlines() if x.startswith("rawcast_step_seconds_count"))


def test_serve_compile_warms_up_before_taking_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rawcast serve --compile``: the engine's warm-up (which builds the compiled step's
    graphs, ``tests/test_engine.py``) runs while the model loads, before the server is
    ready; without ``--compile`` there is none."""
    from rawcast.pipeline.engine import EngineCore
    from rawcast.transports import app as app_mod
    from rawcast.transports import runtime
    from rawcast.transports.metrics import Metrics

    compiled: list[object] = []
    monkeypatch.setattr(runtime, "compile_step", compiled.append)  # the wiring, not inductor
    warmed: list[int] = []
    real = EngineCore.warm_up

    def spy(self: EngineCore, seconds: float = 3.0) -> int:
        warmed.append(real(self, seconds))
        return warmed[-1]

    monkeypatch.setattr(EngineCore, "warm_up", spy)
    for flag in (False, True):
        engine, _ = app_mod.load_engine(
            ServerSettings(max_sessions=2, vad=False, compile=flag), Metrics()
        )
        assert len(compiled) == len(warmed) == int(flag)
        assert engine.core.free_slots == [0, 1] and engine.core.forwards == 0
    assert warmed[0] > 0
