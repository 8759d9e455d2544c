"""Engine invariants: streaming == offline, one forward per tick, bounded state, isolation."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tiny_model import fixture_pcm, tiny_model

from rawcast.model.gemma4 import Gemma4Unified
from rawcast.pipeline.engine import Engine, EngineConfig, EngineCore, Observer, SessionLimitError
from rawcast.pipeline.media import ClosedEvent, ErrorEvent, Event, SpeechEvent, TextEvent
from rawcast.pipeline.session import SessionConfig, Tasks
from rawcast.pipeline.vad import SileroModel, VadConfig

SILENCE = np.zeros(16000, np.float32)


@pytest.fixture(scope="module")
def model() -> Gemma4Unified:
    return tiny_model()


@pytest.fixture(scope="module")
def vad() -> SileroModel:
    return SileroModel()


def _finals(events: list[Event]) -> list[tuple[str, str, int, int]]:
    return [
        (e.task, e.text, e.start_sample, e.end_sample)
        for e in events
        if isinstance(e, TextEvent) and e.final
    ]


def _clip() -> np.ndarray:
    pcm = fixture_pcm()
    return np.concatenate([SILENCE, pcm, SILENCE[:8000], pcm, SILENCE])


CFG = SessionConfig(tasks=Tasks(transcribe=True, translate="Spanish"), max_new_tokens=12)


def test_streaming_equals_offline(model: Gemma4Unified, vad: SileroModel) -> None:
    """Random chunk sizes interleaved with engine ticks give the offline final texts and times."""
    audio = _clip()
    offline = EngineCore(model, vad_model=vad)
    s = offline.open(CFG)
    s.push_audio(audio, 16000)
    s.flush()
    offline.run_until_idle()
    want = _finals(s.outbox)
    assert len(want) == 4  # two utterances x two tasks
    assert all(ev[2] < ev[3] for ev in want)

    rng = random.Random(0)
    for trial in range(2):
        live = EngineCore(model, vad_model=vad)
        t = live.open(CFG)
        i = 0
        while i < audio.size:
            n = rng.randint(1, 9000)
            t.push_audio(audio[i : i + n], 16000)
            i += n
            for _ in range(rng.randint(0, 3) if trial else 1):
                live.step()
        t.flush()
        live.run_until_idle()
        assert _finals(t.outbox) == want


def test_one_forward_per_tick_for_8_sessions_x_3_tasks(model: Gemma4Unified) -> None:
    """With 8 sessions each running transcription, translation and captions, every tick is
    ONE backbone forward, and a tick carries the branches of all 24 tasks together."""
    core = EngineCore(model, EngineConfig(max_sessions=8, max_image_tokens=70))
    cfg = SessionConfig(
        tasks=Tasks(transcribe=True, translate="Spanish", caption=True),
        vad=None, max_new_tokens=6, decode_interval_ms=400, max_soft_tokens=70,
    )  # fmt: skip
    sessions = [core.open(cfg) for _ in range(8)]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    for s in sessions:
        s.push_image(image, 0.0)
        s.push_audio(0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
        s.flush()
    widest = 0
    ticks = 0
    calls = 0
    real_step = model.step

    def counting_step(*a: object, **k: object) -> object:
        nonlocal calls
        calls += 1
        return real_step(*a, **k)  # type: ignore[arg-type]

    model.step = counting_step  # type: ignore[method-assign]
    try:
        while core.has_work():
            before = calls
            rows = core.step()
            if rows:
                ticks += 1
                assert calls - before == 1
                widest = max(widest, rows)
    finally:
        del model.step
    assert ticks > 0 and calls == ticks
    assert widest >= 16  # the audio tasks of all 8 sessions decoded in one forward
    captions = [e for s in sessions for e in s.outbox if isinstance(e, TextEvent)]
    assert {e.task for e in captions} == {"transcribe", "translate", "caption"}


def test_two_hour_stream_stays_bounded(model: Gemma4Unified) -> None:
    """Two hours of audio (accelerated) keep the slot's length, the queue and the positions
    bounded: each segment is reset after its final text."""
    core = EngineCore(
        model, EngineConfig(max_sessions=1, max_segment_s=10.0, max_frames_per_row=125)
    )
    cfg = SessionConfig(vad=None, max_segment_s=10.0, decode_interval_ms=5000, max_new_tokens=2)
    s = core.open(cfg)
    rng = np.random.default_rng(1)
    chunk = (0.01 * rng.standard_normal(16000 * 10)).astype(np.float32)
    bound = core.config.full_capacity()
    longest = 0
    for _ in range(720):  # ten seconds at a time, as fast as the engine goes
        s.push_audio(chunk, 16000)
        while core.has_work():
            core.step()
            longest = max(longest, core.cache.length(s.slot))
            assert len(s.items) < 260
        assert int(core.cache.pos_full.max()) < bound
    assert longest <= 16 + 250
    assert s.segment_id >= 700  # 720 ten-second segments, each reset after its final text
    assert s.frames_in == 2 * 3600 * 25
    assert s.frames_dropped == 0


def test_silence_gives_no_text(model: Gemma4Unified, vad: SileroModel) -> None:
    """A minute of silence and faint noise produces no speech and no text events."""
    core = EngineCore(model, vad_model=vad)
    s = core.open(CFG)
    rng = np.random.default_rng(2)
    s.push_audio(np.zeros(16000 * 30, np.float32), 16000)
    s.push_audio((0.001 * rng.standard_normal(16000 * 30)).astype(np.float32), 16000)
    s.flush()
    core.run_until_idle()
    assert not [e for e in s.outbox if isinstance(e, TextEvent | SpeechEvent)]
    assert core.cache.length(s.slot) == 0


def test_a_failing_session_does_not_disturb_others(model: Gemma4Unified, vad: SileroModel) -> None:
    """Bad media ends its own session with an error; the other session gets its text."""
    core = EngineCore(model, vad_model=vad)
    good, bad = core.open(CFG), core.open(CFG)
    good.push_audio(_clip(), 16000)
    try:
        bad.push_audio(np.full(800, np.nan, np.float32), 16000)
    except ValueError as e:
        core.fail(bad, e)
    good.flush()
    core.run_until_idle()
    assert isinstance(bad.outbox[-1], ClosedEvent)
    assert any(isinstance(e, ErrorEvent) and e.fatal for e in bad.outbox)
    assert len(_finals(good.outbox)) == 4
    assert bad.id not in core.sessions


def test_session_limit_and_slot_reuse(model: Gemma4Unified) -> None:
    """The limit refuses cleanly; closing a session frees its slot for the next one."""
    core = EngineCore(model, EngineConfig(max_sessions=2))
    a = core.open(SessionConfig(vad=None))
    core.open(SessionConfig(vad=None))
    with pytest.raises(SessionLimitError, match="2 session slots"):
        core.open(SessionConfig(vad=None))
    a.push_audio(0.1 * np.ones(6400, np.float32), 16000)
    a.request_close()
    core.run_until_idle()
    assert a.closed and a.id not in core.sessions
    c = core.open(SessionConfig(vad=None))
    assert c.slot == a.slot
    assert core.cache.length(c.slot) == 0


async def test_async_engine_round_trip(model: Gemma4Unified, vad: SileroModel) -> None:
    """The asyncio API: open, push from the loop, close gracefully, read events to the end."""
    engine = Engine(model, EngineConfig(max_sessions=2), vad_model=vad)
    await engine.start()
    try:
        h = await engine.open_session(CFG)
        audio = _clip()
        for i in range(0, audio.size, 3200):
            h.push_audio(audio[i : i + 3200], 16000)
        h.close()
        events = [e async for e in h.events()]
    finally:
        await engine.stop()
    assert isinstance(events[-1], ClosedEvent)
    assert len(_finals(events)) == 4
    assert [e.kind for e in events if isinstance(e, SpeechEvent)] == ["started", "stopped"] * 2


def test_vad_config_is_validated() -> None:
    """Out-of-range settings are refused at construction."""
    with pytest.raises(ValueError):
        VadConfig(threshold=1.5)
    with pytest.raises(ValueError):
        SessionConfig(decode_interval_ms=10)


def test_vad_model_keeps_torch_threads() -> None:
    """Loading the ONNX VAD must not leave torch on one thread (onnxruntime resets OpenMP)."""
    import torch

    before = torch.get_num_threads()
    SileroModel()
    assert torch.get_num_threads() == before


def test_a_long_segment_with_many_images_is_cut_not_failed(model: Gemma4Unified) -> None:
    """When images fill a segment's slot, the segment is cut and decoded; nothing fails."""
    core = EngineCore(model, EngineConfig(max_sessions=1, max_segment_s=4.0, max_image_tokens=70))
    cfg = SessionConfig(
        tasks=Tasks(transcribe=True, caption=True), vad=None, max_segment_s=4.0,
        caption_interval_s=0.2, max_soft_tokens=70, max_new_tokens=3, decode_interval_ms=2000,
    )  # fmt: skip
    s = core.open(cfg)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    for i in range(20):  # 4 s of audio with a picked camera frame every 0.2 s
        s.push_audio((0.05 * rng.standard_normal(3200)).astype(np.float32), 16000)
        s.push_image(image, i * 0.2)
        core.run_until_idle()
        assert core.cache.length(s.slot) <= core.cache.full_capacity
    s.flush()
    core.run_until_idle()
    assert not [e for e in s.outbox if isinstance(e, ErrorEvent)]
    finals = [e for e in s.outbox if isinstance(e, TextEvent) and e.task == "transcribe"]
    assert len(finals) >= 2  # the slot filled up and the segment was cut at least once


def test_abort_frees_the_slot_without_processing_the_backlog(model: Gemma4Unified) -> None:
    """An aborted session drops its queued media and is closed within a tick or two."""
    core = EngineCore(model, EngineConfig(max_sessions=1))
    s = core.open(SessionConfig(vad=None, max_segment_s=10.0))
    s.push_audio(0.05 * np.ones(16000 * 60, np.float32), 16000)  # a minute of backlog
    core.step()
    s.abort()
    ticks = core.run_until_idle()
    assert s.closed and ticks <= 2
    assert not [e for e in s.outbox if isinstance(e, TextEvent)]
    assert core.open(SessionConfig(vad=None)).slot == s.slot


def test_dropped_media_is_reported_to_the_observer(model: Gemma4Unified) -> None:
    """Frames dropped by policy (video cadence, audio backlog) reach the metrics hooks."""
    from rawcast.pipeline.engine import Observer

    class Counting(Observer):
        def __init__(self) -> None:
            self.counts: dict[str, int] = {"audio": 0, "video": 0}

        def dropped(self, kind: str, n: int) -> None:
            self.counts[kind] += n

    obs = Counting()
    core = EngineCore(model, EngineConfig(max_sessions=1, max_image_tokens=70), observer=obs)
    cfg = SessionConfig(
        tasks=Tasks(caption=True), vad=None, max_pending_s=1.0, max_soft_tokens=70,
        caption_interval_s=2.0,
    )  # fmt: skip
    s = core.open(cfg)
    image = np.zeros((48, 48, 3), np.uint8)
    for i in range(30):  # 1 s of 30 fps video: one picked, 29 dropped
        s.push_image(image, i / 30)
    s.push_audio(np.zeros(16000 * 3, np.float32), 16000)  # 3 s queued, 1 s allowed
    assert obs.counts["video"] == 29
    assert obs.counts["audio"] == 50  # 2 s of 40 ms frames
    assert any(isinstance(e, ErrorEvent) and e.code == "overloaded" for e in s.outbox)


def test_streaming_equals_offline_with_the_bundled_model(vad: SileroModel) -> None:
    """The same invariant with the trained rawcast-tiny (skipped if it is not bundled)."""
    from rawcast.model.loader import BUNDLED_DIR, load

    if not (BUNDLED_DIR / "rawcast-tiny" / "config.json").exists():
        pytest.skip("rawcast-tiny is not bundled in this checkout")
    trained = load("rawcast-tiny")
    audio = _clip()
    offline = EngineCore(trained, vad_model=vad)
    s = offline.open(CFG)
    s.push_audio(audio, 16000)
    s.flush()
    offline.run_until_idle()
    want = _finals(s.outbox)
    assert len(want) == 4
    live = EngineCore(trained, vad_model=vad)
    t = live.open(CFG)
    rng = random.Random(5)
    i = 0
    while i < audio.size:
        n = rng.randint(1, 12000)
        t.push_audio(audio[i : i + n], 16000)
        i += n
        live.step()
    t.flush()
    live.run_until_idle()
    assert _finals(t.outbox) == want


def test_a_busy_stream_does_not_starve_a_quiet_one(model: Gemma4Unified) -> None:
    """A session with a minute of backlog shares every tick: a short session's final text
    arrives while most of the busy session's audio is still queued."""
    core = EngineCore(model, EngineConfig(max_sessions=2, max_frames_per_row=32))
    cfg = SessionConfig(vad=None, max_new_tokens=4, decode_interval_ms=4000, max_pending_s=90)
    busy, quiet = core.open(cfg), core.open(cfg)
    busy.push_audio(0.05 * np.ones(16000 * 60, np.float32), 16000)
    quiet.push_audio(0.05 * np.ones(16000, np.float32), 16000)
    quiet.flush()
    while not any(isinstance(e, TextEvent) and e.final for e in quiet.outbox):
        assert core.step() > 0
    assert busy.pending_frames() > 0.8 * 60 * 25


async def test_a_client_faster_than_the_worker_is_bounded_not_buffered(
    model: Gemma4Unified,
) -> None:
    """Queues between the loop and the worker are bounded per session: with the worker
    stalled, camera frames are dropped first (counted), and past the audio bound the
    session gets a fatal ``overloaded`` error instead of growing memory; another
    session carries on."""
    import threading

    from rawcast.pipeline.engine import Observer

    class Counting(Observer):
        def __init__(self) -> None:
            self.dropped_video = 0
            self.errors: list[str] = []

        def dropped(self, kind: str, n: int) -> None:
            self.dropped_video += n if kind == "video" else 0

        def error(self, kind: str) -> None:
            self.errors.append(kind)

    obs = Counting()
    config = EngineConfig(max_sessions=2, max_inflight_audio_s=2.0, max_inflight_images=2)
    engine = Engine(model, config, observer=obs)
    await engine.start()
    gate = threading.Event()
    try:
        cfg = SessionConfig(tasks=Tasks(transcribe=True, caption=True), vad=None)
        fast = await engine.open_session(cfg)
        calm = await engine.open_session(SessionConfig(tasks=Tasks(transcribe=True), vad=None))
        engine._submit("", lambda _s: gate.wait(30))  # the worker is stuck in a long tick
        image = np.zeros((48, 48, 3), np.uint8)
        for i in range(10):
            fast.push_image(image, i / 10)
        assert fast.inflight.images == 2 and obs.dropped_video == 8
        chunk = np.zeros(3200, np.float32)  # 200 ms
        pushed = 0
        while not fast.closed and pushed < 100:
            fast.push_audio(chunk, 16000)
            pushed += 1
        assert fast.closed and pushed == 11  # 10 chunks (2 s) fit; the 11th overloads
        assert fast.inflight.audio_s <= 2.0 + 1e-9
        calm.push_audio(chunk, 16000)  # the other session is untouched
        with pytest.raises(RuntimeError, match="closed"):
            fast.push_audio(chunk, 16000)
        gate.set()
        events = [e async for e in fast.events()]
        calm.push_audio(np.zeros(16000, np.float32), 16000)
        calm.close()
        calm_events = [e async for e in calm.events()]
    finally:
        gate.set()
        await engine.stop()
    err = events[0]
    assert isinstance(err, ErrorEvent) and err.code == "overloaded" and err.fatal
    assert isinstance(events[-1], ClosedEvent) and events[-1].reason == "aborted"
    assert fast.inflight.commands == 0 and fast.inflight.audio_s == pytest.approx(0.0, abs=1e-9)
    assert "overloaded" in obs.errors
    assert isinstance(calm_events[-1], ClosedEvent) and calm_events[-1].reason == "closed"
    assert not any(isinstance(e, ErrorEvent) for e in calm_events)


class _Ticks(Observer):
    def __init__(self) -> None:
        self.ticks = 0

    def tick(self, rows: int, seconds: float) -> None:
        self.ticks += 1


def test_warm_up_builds_every_graph_a_live_run_needs(vad: SileroModel) -> None:
    """``--compile`` warms up at start-up (``EngineCore.warm_up``): afterwards, live
    sessions (speech through Silero VAD, all three tasks, camera frames, ragged pushes,
    a second session joining mid-utterance) trace no new graph, so no client ever waits
    for a compile. Graphs are counted with dynamo's eager backend: the same graphs and
    guards as inductor, without generating code. The warm-up leaves nothing behind: all
    slots free, counters at zero, the observer never told."""
    import torch._dynamo

    from rawcast.transports.runtime import compile_step

    m = tiny_model()
    compile_step(m, backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    obs = _Ticks()
    core = EngineCore(m, EngineConfig(max_sessions=3), vad_model=vad, observer=obs)
    assert core.warm_up() > 0
    built = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert built == 6  # one row or several x one token or several x an image or not
    assert (core.free_slots, core.sessions, core.forwards, obs.ticks) == ([0, 1, 2], {}, 0, 0)

    rng = random.Random(1)
    audio = _clip()
    cfg = SessionConfig(
        tasks=Tasks(transcribe=True, translate="Spanish", caption=True), max_new_tokens=6
    )
    live = [core.open(cfg), core.open(SessionConfig(max_new_tokens=6))]
    pos = [0, -24_000]  # the second session starts 1.5 s later
    frame = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    while any(p < audio.size for p in pos):
        for s, p in zip(live, pos, strict=True):
            if 0 <= p < audio.size:
                s.push_image(frame, p / 16_000)
        for i, s in enumerate(live):
            n = rng.choice([320, 640, 1280, 1920, 4000])
            if 0 <= pos[i] < audio.size:
                s.push_audio(audio[pos[i] : pos[i] + n], 16_000)
            pos[i] += n
        for _ in range(rng.randint(0, 2)):
            core.step()
    for s in live:
        s.flush()
    core.run_until_idle()
    finals = [e for s in live for e in s.outbox if isinstance(e, TextEvent) and e.final]
    assert {e.task for e in finals} == {"transcribe", "translate", "caption"}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == built


def test_a_warm_up_that_fails_refuses_to_start(model: Gemma4Unified) -> None:
    """A step that fails in the warm-up would fail every client: ``warm_up`` raises with
    the step's error (serve then does not come up) and still frees its slots."""

    class Broken:
        def step(self, rows: object, cache: object) -> None:
            raise RuntimeError("no kernel for this step")

    core = EngineCore(model, EngineConfig(max_sessions=2), backend=Broken())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"warm-up failed: .*no kernel for this step"):
        core.warm_up()
    assert (core.free_slots, core.sessions) == ([0, 1], {})


def test_a_session_that_names_no_image_budget_gets_the_checkpoints(model: Gemma4Unified) -> None:
    """Pictures are patched at the budget the checkpoint was trained at (its
    preprocessor_config.json), capped by the engine's max_image_tokens; a session may
    still name its own, within the cap."""
    tasks = Tasks(caption=True)
    before = model.image_budget
    try:
        for own, cap, want in ((70, 280, 70), (280, 280, 280), (560, 140, 140), (280, 100, 70)):
            model.image_budget = own
            core = EngineCore(model, EngineConfig(max_sessions=1, max_image_tokens=cap))
            s = core.open(SessionConfig(tasks=tasks, vad=None))
            assert (s.config.max_soft_tokens, s.sampler.config.max_soft_tokens) == (want, want)
            core.release(s)
        core = EngineCore(model, EngineConfig(max_sessions=1, max_image_tokens=280))
        s = core.open(SessionConfig(tasks=tasks, vad=None, max_soft_tokens=140))
        assert s.sampler.config.max_soft_tokens == 140
        core.release(s)
        with pytest.raises(ValueError, match="exceeds the engine's max_image_tokens"):
            core.open(SessionConfig(tasks=tasks, vad=None, max_soft_tokens=560))
    finally:
        model.image_budget = before
