"""The streaming engine: ONE batched forward per tick for every session and task.

``EngineCore`` has no threads and no asyncio. Each ``step()`` it asks every
session (round-robin, within a token budget for fairness) for its rows: media
appends, the first chunk of a task branch (closing tokens + instruction), or one
decode token per open branch. All rows go through ``model.step`` as ONE ragged
forward; greedy tokens are routed back to their branches. An error in one
session's work ends that session with an error event; the others go on (the
failed tick is retried per session to find the culprit).

``Engine`` runs a core on one worker thread that owns the model and exposes an
asyncio API (``open_session``, ``SessionHandle.push_audio`` ...). Calls from the
event loop only enqueue commands; framing, VAD, patching and model steps all run
on the worker. Events come back through a per-session asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from rawcast.model.cache import CacheSpec, KVCache
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.prompt import PromptFormat
from rawcast.model.tokenizer import Tokenizer
from rawcast.pipeline.media import ClosedEvent, ErrorEvent, Event
from rawcast.pipeline.session import Session, SessionConfig, Tasks
from rawcast.pipeline.vad import SileroModel, Vad, VadConfig

log = structlog.get_logger(__name__)


class SessionLimitError(RuntimeError):
    """All session slots are in use."""


class Observer:
    """Hooks for metrics (no-ops here; the server plugs in Prometheus)."""

    def tick(self, rows: int, seconds: float) -> None:
        pass

    def event_latency(self, task: str, seconds: float) -> None:
        pass

    def error(self, kind: str) -> None:
        pass

    def dropped(self, kind: str, n: int) -> None:
        """Media dropped by an explicit policy: ``audio`` (engine behind) or ``video``."""

    def lagging(self, sessions: int) -> None:
        """Sessions with more than a second of audio waiting for the engine."""


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 8
    max_segment_s: float = 30.0  # sessions may not ask for longer segments
    max_image_tokens: int = 280
    max_images_per_segment: int = 4
    branch_room: int = 128
    max_tokens_per_tick: int = 2048
    max_frames_per_row: int = 64

    def full_capacity(self) -> int:
        frames = int(self.max_segment_s * 25) + 1
        images = self.max_images_per_segment * (self.max_image_tokens + 4)
        return 16 + frames + images


class EngineCore:
    def __init__(
        self,
        model: Gemma4Unified,
        config: EngineConfig | None = None,
        vad_model: SileroModel | None = None,
        tokenizer: Tokenizer | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.observer = observer or Observer()
        tok = tokenizer or model.tokenizer
        if tok is None:
            raise ValueError("the engine needs a tokenizer (the checkpoint's tokenizer.json)")
        self.tok = tok
        self.fmt = PromptFormat(tok)
        self.vad_model = vad_model
        spec = CacheSpec(
            slots=self.config.max_sessions,
            full_capacity=self.config.full_capacity(),
            branch_room=self.config.branch_room,
            branches=3 * self.config.max_sessions,
        )
        self.cache = KVCache(model.cfg.text, spec, device=model.device, dtype=model.dtype)
        self.free_slots = list(range(self.config.max_sessions))
        self.sessions: dict[str, Session] = {}
        self._rr = 0
        self.forwards = 0
        self.ticks = 0
        ids = model.cfg.tokens
        self._suppress = torch.tensor(
            sorted({ids.eoa, ids.eoi, ids.boa, ids.boi, ids.audio, ids.image, ids.video, ids.pad}),
            device=model.device,
        )

    # --- sessions ---

    def open(
        self,
        config: SessionConfig | None = None,
        emit: Callable[[Event], None] | None = None,
        session_id: str | None = None,
    ) -> Session:
        config = config or SessionConfig()
        if config.max_segment_s > self.config.max_segment_s:
            raise ValueError(
                f"max_segment_s {config.max_segment_s} exceeds the engine's "
                f"{self.config.max_segment_s}"
            )
        if config.max_soft_tokens > self.config.max_image_tokens:
            raise ValueError(
                f"max_soft_tokens {config.max_soft_tokens} exceeds the engine's "
                f"max_image_tokens {self.config.max_image_tokens}"
            )
        if not self.free_slots:
            raise SessionLimitError(
                f"all {self.config.max_sessions} session slots are in use; try again later"
            )
        slot = self.free_slots.pop(0)
        buffers = (3 * slot, 3 * slot + 1, 3 * slot + 2)
        self.cache.reset(slot)
        s = Session(slot, buffers, config, self.tok, self.vad_model, emit, session_id)
        s.on_latency = self.observer.event_latency
        s.on_drop = self.observer.dropped
        self.sessions[s.id] = s
        log.info("session.opened", session_id=s.id, slot=slot)
        return s

    def release(self, s: Session) -> None:
        """Free a closed session's slot for reuse."""
        if not s.closed:
            s.close(self.cache)
        if self.sessions.pop(s.id, None) is not None:
            self.free_slots.append(s.slot)

    def fail(self, s: Session, exc: BaseException) -> None:
        log.error("session.failed", session_id=s.id, error=repr(exc))
        self.observer.error(type(exc).__name__)
        s.fail(self.cache, "session_error", f"{type(exc).__name__}: {exc}")
        self.release(s)

    # --- the tick ---

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.sessions.values())

    def step(self) -> int:
        """Run one tick: ONE forward over all pending work. Returns the number of rows."""
        order = list(self.sessions.values())
        if not order:
            return 0
        self._rr = (self._rr + 1) % len(order)
        order = order[self._rr :] + order[: self._rr]
        rows: list[Append] = []
        owners: list[Session] = []
        budget = self.config.max_tokens_per_tick
        for s in order:
            if budget <= 0:
                break
            try:
                got = s.next_rows(self.cache, self.config.max_frames_per_row)
            except Exception as e:  # one stream's bad media must not stop the others
                self.fail(s, e)
                continue
            if s.closed:
                self.release(s)
                continue
            for r in got:
                rows.append(r)
                owners.append(s)
                budget -= len(r.tokens)
        if not rows:
            return 0
        t0 = time.perf_counter()
        tokens = self._forward(rows, owners)
        self.observer.tick(len(rows), time.perf_counter() - t0)
        if self.ticks % 25 == 0:
            lag = sum(s.pending_frames() > 25 for s in self.sessions.values())
            self.observer.lagging(lag)
        for r, s, tok in zip(rows, owners, tokens, strict=True):
            if s.closed or tok is None or r.branch is None:
                continue
            try:
                s.on_token(r, tok, self.cache)
            except Exception as e:
                self.fail(s, e)
        self.ticks += 1
        return len(rows)

    def _greedy(self, logits: torch.Tensor) -> list[int]:
        logits = logits.index_fill(-1, self._suppress, float("-inf"))
        return [int(t) for t in logits.argmax(-1).tolist()]

    def _forward(self, rows: list[Append], owners: list[Session]) -> list[int | None]:
        self.forwards += 1
        try:
            return list(self._greedy(self.model.step(rows, self.cache)))
        except Exception:
            log.warning("tick.failed_retrying_per_session", rows=len(rows))
        out: list[int | None] = [None] * len(rows)
        for s in dict.fromkeys(owners):
            idx = [i for i, o in enumerate(owners) if o is s]
            try:
                self.forwards += 1
                toks = self._greedy(self.model.step([rows[i] for i in idx], self.cache))
            except Exception as e:
                self.fail(s, e)
                continue
            for i, t in zip(idx, toks, strict=True):
                out[i] = t
        return out

    def run_until_idle(self, max_ticks: int = 1_000_000) -> int:
        """Step until no session has work (offline use and tests). Returns ticks run."""
        n = 0
        while self.has_work() and n < max_ticks:
            self.step()
            n += 1
        return n


# --- the asyncio adapter --------------------------------------------------------------------


class SessionHandle:
    """The event-loop side of one session: enqueue media, read events."""

    def __init__(self, engine: Engine, session_id: str) -> None:
        self.engine = engine
        self.id = session_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.closed = False

    def _send(self, fn: Callable[[Session], None]) -> None:
        if self.closed:
            raise RuntimeError(f"session {self.id} is closed")
        self.engine._submit(self.id, fn)

    def push_audio(self, pcm: Any, sample_rate: int | None = None, **kw: Any) -> None:
        """Queue PCM (numpy or av.AudioFrame); framing happens on the worker."""
        self._send(lambda s: s.push_audio(pcm, sample_rate, **kw))

    def push_image(self, image: Any, time: float) -> None:
        self._send(lambda s: s.push_image(image, time))

    def configure(self, tasks: Tasks) -> None:
        self._send(lambda s: s.configure(tasks))

    def commit(self) -> None:
        self._send(lambda s: s.commit())

    def clear(self) -> None:
        """Drop audio that has not produced text yet (OpenAI ``input_audio_buffer.clear``)."""
        self._send(lambda s: s.clear())

    def set_vad(self, config: VadConfig | None) -> None:
        """Turn server-side voice activity detection on (with these settings) or off."""
        vad_model = self.engine.core.vad_model

        def apply(s: Session) -> None:
            if config is not None and vad_model is None:
                raise RuntimeError("this server runs without a VAD model")
            s.set_vad(Vad(vad_model, config) if config is not None and vad_model else None)

        self._send(apply)

    def flush(self) -> None:
        self._send(lambda s: s.flush())

    def close(self, graceful: bool = True) -> None:
        """Finish queued work (graceful) or drop it, then free the slot."""
        if self.closed:
            return
        if graceful:

            def finish(s: Session) -> None:
                s.flush()
                s.request_close()

            self._send(finish)
        else:
            self.engine._submit(self.id, lambda s: s.abort())
        self.closed = True

    async def events(self) -> AsyncIterator[Event]:
        """Events until the session is closed (the ClosedEvent is the last one yielded)."""
        while True:
            ev = await self.queue.get()
            yield ev
            if isinstance(ev, ClosedEvent):
                return


class Engine:
    """One worker thread owns the model and runs ``EngineCore`` ticks."""

    def __init__(
        self,
        model: Gemma4Unified,
        config: EngineConfig | None = None,
        vad_model: SileroModel | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.core = EngineCore(model, config, vad_model, observer=observer)
        self._commands: queue.SimpleQueue[tuple[str, Callable[[Session], Any]]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handles: dict[str, SessionHandle] = {}
        self._lock = threading.Lock()
        self.accepting = True

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="rawcast-engine", daemon=True)
        self._thread.start()

    async def stop(self, grace_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, grace_s)

    @property
    def active_sessions(self) -> int:
        return len(self._handles)

    async def open_session(
        self, config: SessionConfig | None = None, session_id: str | None = None
    ) -> SessionHandle:
        if not self.accepting:
            raise SessionLimitError("the server is draining; retry on another replica")
        fut: asyncio.Future[SessionHandle] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def do() -> None:
            handle_box: list[SessionHandle] = []

            def emit(ev: Event) -> None:
                h = handle_box[0]
                loop.call_soon_threadsafe(self._deliver, h, ev)

            try:
                s = self.core.open(config, emit=emit, session_id=session_id)
            except Exception as e:
                loop.call_soon_threadsafe(_set_exc, fut, e)
                return
            h = SessionHandle(self, s.id)
            handle_box.append(h)
            with self._lock:
                self._handles[s.id] = h
            loop.call_soon_threadsafe(_set_result, fut, h)

        self._commands.put(("", lambda _s: do()))
        self._wake.set()
        return await fut

    def _deliver(self, h: SessionHandle, ev: Event) -> None:
        h.queue.put_nowait(ev)
        if isinstance(ev, ClosedEvent):
            h.closed = True
            with self._lock:
                self._handles.pop(h.id, None)

    def _submit(self, sid: str, fn: Callable[[Session], Any]) -> None:
        self._commands.put((sid, fn))
        self._wake.set()

    def _apply_commands(self) -> None:
        while True:
            try:
                sid, fn = self._commands.get_nowait()
            except queue.Empty:
                return
            if not sid:
                fn(None)  # type: ignore[arg-type]  # engine-level command
                continue
            s = self.core.sessions.get(sid)
            if s is None or s.closed:
                continue
            try:
                fn(s)
            except Exception as e:  # bad media from one client ends that session only
                self.core.fail(s, e)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._apply_commands()
            try:
                did = self.core.step()
            except Exception:
                log.exception("engine.tick_crashed")
                did = 0
            for s in [s for s in self.core.sessions.values() if s.closed]:
                self.core.release(s)
            if not did and not self.core.has_work():
                self._wake.wait(0.05)
                self._wake.clear()


def _set_result(fut: asyncio.Future[SessionHandle], h: SessionHandle) -> None:
    if not fut.done():
        fut.set_result(h)


def _set_exc(fut: asyncio.Future[SessionHandle], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineCore",
    "ErrorEvent",
    "SessionConfig",
    "SessionHandle",
    "SessionLimitError",
    "Tasks",
]
