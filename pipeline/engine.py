"""The streaming engine: ONE batched forward per tick for every session and task.

``EngineCore`` has no threads and no asyncio. Each ``step()`` it asks every
session (round-robin, within a token budget for fairness) for its rows: media
appends, the first chunk of a task branch (closing tokens + instruction), or one
decode token per open branch. All rows go through ``model.step`` as ONE ragged
forward; greedy tokens are routed back to their branches. An error in one
session's work ends that session with an error event; the others go on (the
failed tick is retried per session to find the culprit).

With a drafter (speculative greedy decoding, ``model/speculative.py``) every open
branch past its prompt decodes as a ``Stream``: each tick ONE batched ``draft``
call turns the branches' one-token rows into verify rows ``[token, d1 .. dk]``,
which join the other rows in the SAME single forward (``model.step_hidden``; plain
rows take ``head`` of their last hidden state); ``accept`` keeps the agreeing
drafts, rolls the branch buffer back past the rest and returns the tokens to route,
possibly several per tick. The emitted tokens are exactly plain greedy decoding's
(up to floating-point reduction order), in fewer ticks when drafts are accepted.

``Engine`` runs a core on one worker thread that owns the model and exposes an
asyncio API (``open_session``, ``SessionHandle.push_audio`` ...). Calls from the
event loop only enqueue commands; framing, VAD, patching and model steps all run
on the worker. Events come back through a per-session asyncio queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import av
import numpy as np
import structlog
import torch

from rawcast.model.cache import CacheSpec, KVCache
from rawcast.model.config import SOFT_TOKEN_BUDGETS
from rawcast.model.gemma4 import Append, Gemma4Unified
from rawcast.model.prompt import PromptFormat
from rawcast.model.speculative import Proposer, SpecConfig, Stream, accept, draft
from rawcast.model.tokenizer import Tokenizer
from rawcast.pipeline.media import ClosedEvent, ErrorEvent, Event
from rawcast.pipeline.session import Session, SessionConfig, Tasks
from rawcast.pipeline.vad import SileroModel, Vad, VadConfig

log = structlog.get_logger(__name__)

# (session id or "" for engine-level work, the work, called on the worker once applied)
Command = tuple[str, Callable[[Session], Any], Callable[[], None] | None]


class StepBackend(Protocol):
    """What runs a tick's forward: the torch model itself, or ``OnnxStep``."""

    def step(self, rows: Sequence[Append], cache: KVCache) -> torch.Tensor: ...


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
    # Bounds on what one session may have queued between the event loop and the worker
    # (commands the worker has not applied yet). Past the audio or command bound the
    # session ends with a fatal ``overloaded`` error; past the image bound new camera
    # frames are dropped (counted as ``video`` drops) while audio keeps flowing.
    max_inflight_audio_s: float = 10.0
    max_inflight_images: int = 2
    max_inflight_commands: int = 512

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
        backend: StepBackend | None = None,
        drafter: Proposer | None = None,
        spec: SpecConfig | None = None,
    ) -> None:
        self.model = model
        self.backend: StepBackend = backend if backend is not None else model
        self.config = config or EngineConfig()
        if drafter is not None and self.backend is not model:
            raise ValueError(
                "speculative decoding (a drafter) needs the torch backend: "
                f"{type(self.backend).__name__} has no step_hidden"
            )
        self.drafter = drafter
        self.spec = spec or SpecConfig()
        self.observer = observer or Observer()
        tok = tokenizer or model.tokenizer
        if tok is None:
            raise ValueError("the engine needs a tokenizer (the checkpoint's tokenizer.json)")
        self.tok = tok
        self.fmt = PromptFormat(tok)
        self.vad_model = vad_model
        cache_spec = CacheSpec(
            slots=self.config.max_sessions,
            full_capacity=self.config.full_capacity(),
            branch_room=self.config.branch_room,
            branches=3 * self.config.max_sessions,
        )
        self.cache = KVCache(model.cfg.text, cache_spec, device=model.device, dtype=model.dtype)
        self.free_slots = list(range(self.config.max_sessions))
        self.sessions: dict[str, Session] = {}
        self._rr = 0
        self.forwards = 0
        self.ticks = 0
        self.draft_calls = 0  # batched drafter calls (the drafter's forwards, not in ``forwards``)
        self.drafted = 0  # draft tokens verified
        self.accepted = 0  # ... and accepted by the target
        self._streams: dict[int, Stream] = {}  # branch buffer -> its speculative decode
        ids = model.cfg.tokens
        self._suppress = torch.tensor(
            sorted({ids.eoa, ids.eoi, ids.boa, ids.boi, ids.audio, ids.image, ids.video, ids.pad}),
            device=model.device,
        )
        if drafter is not None:
            self._check_branch_room(SessionConfig())

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the target accepted (0 without a drafter)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def _check_branch_room(self, config: SessionConfig) -> None:
        """With a drafter, a branch buffer must hold the prompt, the longest decode and the
        rejected drafts of a full-length verify row (``max_new_tokens + prompt + k_max + 1``)."""
        prompts = [self.fmt.branch(t, lang) for t, lang in config.tasks.audio_tasks()]
        prompts += [self.fmt.branch("caption")]
        need = max(map(len, prompts)) + config.max_new_tokens + self.spec.k_max + 1
        if self.config.branch_room < need:
            raise ValueError(
                f"branch_room {self.config.branch_room} is too small for speculative decoding: "
                f"need {need} (prompt {need - config.max_new_tokens - self.spec.k_max - 1} + "
                f"max_new_tokens {config.max_new_tokens} + k_max {self.spec.k_max} + 1)"
            )

    # --- sessions ---

    def open(
        self,
        config: SessionConfig | None = None,
        emit: Callable[[Event], None] | None = None,
        session_id: str | None = None,
    ) -> Session:
        config = config or SessionConfig()
        budget = config.max_soft_tokens or self.image_budget()
        config = dataclasses.replace(config, max_soft_tokens=budget)
        if config.max_segment_s > self.config.max_segment_s:
            raise ValueError(
                f"max_segment_s {config.max_segment_s} exceeds the engine's "
                f"{self.config.max_segment_s}"
            )
        if budget > self.config.max_image_tokens:
            raise ValueError(
                f"max_soft_tokens {budget} exceeds the engine's "
                f"max_image_tokens {self.config.max_image_tokens}"
            )
        if self.drafter is not None:
            self._check_branch_room(config)
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

    def image_budget(self) -> int:
        """Soft tokens per picture for a session that names none: the checkpoint's own
        budget (what it was trained at), or the largest that fits ``max_image_tokens``."""
        fits = [b for b in SOFT_TOKEN_BUDGETS if b <= self.config.max_image_tokens]
        return min(self.model.image_budget, max(fits, default=SOFT_TOKEN_BUDGETS[0]))

    def release(self, s: Session) -> None:
        """Free a closed session's slot for reuse."""
        if not s.closed:
            s.close(self.cache)
        if self.sessions.pop(s.id, None) is not None:
            self.free_slots.append(s.slot)
        for buf in s.buffers:
            self._streams.pop(buf, None)

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
                if self.drafter is not None and r.branch is not None and len(r.tokens) == 1:
                    budget -= self.spec.k_max  # a decode row may become a verify row
        if not rows:
            return 0
        t0 = time.perf_counter()
        if self.drafter is not None:
            self._speculative_tick(rows, owners)
        else:
            tokens = self._forward(rows, owners)
            for r, s, tok in zip(rows, owners, tokens, strict=True):
                self._route(s, r, None if tok is None else [tok])
        self.observer.tick(len(rows), time.perf_counter() - t0)
        if self.ticks % 25 == 0:
            lag = sum(s.pending_frames() > 25 for s in self.sessions.values())
            self.observer.lagging(lag)
        self.ticks += 1
        return len(rows)

    def _route(self, s: Session, row: Append, tokens: list[int] | None) -> None:
        """Hand a branch row's greedy tokens to its session (in order)."""
        if s.closed or tokens is None or row.branch is None:
            return
        try:
            s.on_tokens(row, tokens, self.cache)
        except Exception as e:
            self.fail(s, e)

    # --- speculative decoding (with a drafter) ---

    def _streams_for(self, rows: list[Append], owners: list[Session]) -> list[int]:
        """Indices of the rows that decode a branch as a ``Stream``, budgets updated."""
        out = []
        for i, (r, s) in enumerate(zip(rows, owners, strict=True)):
            st = None if r.branch is None else self._streams.get(r.branch)
            b = None if r.branch is None else s.branch(r.branch)
            if st is None or b is None or b.fed == 0 or st.slot != r.slot:
                continue
            if len(r.tokens) != 1 or int(torch.as_tensor(r.tokens).reshape(-1)[0]) != st.token:
                continue
            st.budget = s.config.max_new_tokens - len(b.generated)
            out.append(i)
        return out

    def _draft(self, rows: list[Append], owners: list[Session], spec: list[int]) -> None:
        """Replace the streams' rows by their verify rows, drafted in ONE drafter call."""
        streams = [self._streams[rows[i].branch] for i in spec]  # type: ignore[index]
        try:
            verify = draft(self.drafter, self.model, self.cache, streams, self._suppress)
            self.draft_calls += any(len(v.tokens) > 1 for v in verify)  # k = 0: no call
            for i, v in zip(spec, verify, strict=True):
                rows[i] = v
            return
        except Exception:  # find the culprit: draft per session (its rows stay plain)
            log.warning("draft.failed_retrying_per_session", rows=len(spec))
        for s in dict.fromkeys(owners[i] for i in spec):
            mine = [j for j, i in enumerate(spec) if owners[i] is s]
            try:
                self.draft_calls += 1
                got = draft(
                    self.drafter, self.model, self.cache, [streams[j] for j in mine], self._suppress
                )
            except Exception as e:
                self.fail(s, e)
                continue
            for j, v in zip(mine, got, strict=True):
                rows[spec[j]] = v

    def _speculative_tick(self, rows: list[Append], owners: list[Session]) -> None:
        spec = self._streams_for(rows, owners)
        if spec:
            self._draft(rows, owners, spec)
            if any(s.closed for s in owners):  # a session failed in the drafter: drop its rows
                keep = [i for i, s in enumerate(owners) if not s.closed]
                spec = [keep.index(i) for i in spec if not owners[i].closed]
                rows[:] = [rows[i] for i in keep]
                owners[:] = [owners[i] for i in keep]
        if not rows:
            return
        hidden = self._forward_hidden(rows, owners)
        stop = self.fmt.stop_ids
        # plain branch rows (prompts): head of the last hidden state; start their streams
        verifying = set(spec)
        plain = [
            i
            for i, r in enumerate(rows)
            if r.branch is not None and hidden[i] is not None and i not in verifying
        ]
        if plain:
            last = torch.stack([hidden[i][-1] for i in plain])  # type: ignore[index]
            for i, h, tok in zip(plain, last, self._greedy(self.model.head(last)), strict=True):
                r, s = rows[i], owners[i]
                assert r.branch is not None
                self._route(s, r, [tok])
                b = None if s.closed else s.branch(r.branch)
                if b is None:
                    self._streams.pop(r.branch, None)
                    continue
                budget = s.config.max_new_tokens - len(b.generated)
                self._streams[r.branch] = Stream.start(r, h.clone(), tok, self.spec.k, budget)
        # verify rows: accept, then route every emitted token
        live = [i for i in spec if hidden[i] is not None]
        if not live:
            return
        width = max(len(rows[i].tokens) for i in live)
        h = hidden[live[0]]
        assert h is not None
        padded = h.new_zeros((len(live), width, h.shape[-1]))
        for j, i in enumerate(live):
            hi = hidden[i]
            assert hi is not None
            padded[j, : hi.shape[0]] = hi
        streams = [self._streams[rows[i].branch] for i in live]  # type: ignore[index]
        before = [(st.drafted, st.accepted) for st in streams]
        emitted = accept(
            self.model, self.cache, streams, [rows[i] for i in live], padded,
            self.spec, stop, self._suppress,
        )  # fmt: skip
        for i, st, toks, (d0, a0) in zip(live, streams, emitted, before, strict=True):
            self.drafted += st.drafted - d0
            self.accepted += st.accepted - a0
            r, s = rows[i], owners[i]
            assert r.branch is not None
            self._route(s, r, toks)
            if st.done or s.closed or s.branch(r.branch) is None:
                self._streams.pop(r.branch, None)

    def _greedy(self, logits: torch.Tensor) -> list[int]:
        logits = logits.index_fill(-1, self._suppress, float("-inf"))
        return [int(t) for t in logits.argmax(-1).tolist()]

    def _forward(self, rows: list[Append], owners: list[Session]) -> list[int | None]:
        self.forwards += 1
        try:
            return list(self._greedy(self.backend.step(rows, self.cache)))
        except Exception:
            log.warning("tick.failed_retrying_per_session", rows=len(rows))
        out: list[int | None] = [None] * len(rows)
        for s in dict.fromkeys(owners):
            idx = [i for i, o in enumerate(owners) if o is s]
            try:
                self.forwards += 1
                toks = self._greedy(self.backend.step([rows[i] for i in idx], self.cache))
            except Exception as e:
                self.fail(s, e)
                continue
            for i, t in zip(idx, toks, strict=True):
                out[i] = t
        return out

    def _forward_hidden(
        self, rows: list[Append], owners: list[Session]
    ) -> list[torch.Tensor | None]:
        """``_forward`` for a speculative tick: each row's hidden states (T_i, H), None
        for the rows of a session whose step failed."""
        self.forwards += 1
        try:
            h = self.model.step_hidden(rows, self.cache)
            return [h[i, : len(r.tokens)] for i, r in enumerate(rows)]
        except Exception:
            log.warning("tick.failed_retrying_per_session", rows=len(rows))
        out: list[torch.Tensor | None] = [None] * len(rows)
        for s in dict.fromkeys(owners):
            idx = [i for i, o in enumerate(owners) if o is s]
            try:
                self.forwards += 1
                h = self.model.step_hidden([rows[i] for i in idx], self.cache)
            except Exception as e:
                self.fail(s, e)
                continue
            for j, i in enumerate(idx):
                out[i] = h[j, : len(rows[i].tokens)]
        return out

    def warm_up(self, seconds: float = 3.0) -> int:
        """Run every kind of step live streams make on scratch sessions, then free them.

        A compiled step (``--compile``) builds one graph per kind of step (one row or
        several, one token or more, audio, an image, branch prompts and decodes, alone
        or mixed) the first time it meets it, and a C++ compile takes a small CPU long:
        done here, before the first client, instead of freezing every live stream.
        Two sessions with all tasks get noise in 40-120 ms pushes, the second starting
        later (so one session's audio meets the other's decodes in one step), and
        an image each. Counters and the observer see none of it. Returns the ticks run."""
        if self.sessions:
            raise RuntimeError("warm_up() runs before the first session")
        observer, self.observer = self.observer, Observer()
        rng = np.random.default_rng(0)
        tasks = Tasks(transcribe=True, translate="Spanish", caption=True)
        config = SessionConfig(tasks=tasks, vad=None, max_new_tokens=4, max_soft_tokens=
                               min(70, self.config.max_image_tokens))  # fmt: skip
        n = min(2, self.config.max_sessions)
        sessions = [self.open(config, session_id=f"warm-up-{i}") for i in range(n)]
        frames = int(seconds * 25)
        image = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
        ticks = 0
        try:
            t = [0] * n  # frames pushed per session
            for k in range(frames + 12 * (n - 1)):
                for i, s in enumerate(sessions):
                    if k < 12 * i or t[i] >= frames:
                        continue
                    if t[i] == 0:
                        s.push_image(image, 0.0)
                    step = (1, 3, 1, 2)[k % 4]
                    pcm = (0.05 * rng.standard_normal(640 * step)).astype(np.float32)
                    s.push_audio(pcm, 16_000)
                    t[i] += step
                    if t[i] >= frames:
                        s.commit()
                self.step()
                ticks += 1
            ticks += self.run_until_idle()
            failed = [e for s in sessions for e in s.outbox if isinstance(e, ErrorEvent)]
            if failed:  # a step that fails here would fail every client: refuse to start
                raise RuntimeError(f"the engine's warm-up failed: {failed[0].message}")
        finally:
            for s in sessions:
                self.release(s)
            self.free_slots.sort()
            self.observer = observer
            self.forwards = self.ticks = self.draft_calls = self.drafted = self.accepted = 0
        return ticks

    def run_until_idle(self, max_ticks: int = 1_000_000) -> int:
        """Step until no session has work (offline use and tests). Returns ticks run."""
        n = 0
        while self.has_work() and n < max_ticks:
            self.step()
            n += 1
        return n


# --- the asyncio adapter --------------------------------------------------------------------


@dataclass
class InFlight:
    """What one session has queued for the worker and the worker has not applied yet.

    Incremented on the event loop, decremented on the worker (under ``lock``)."""

    commands: int = 0
    audio_s: float = 0.0
    images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, commands: int, audio_s: float, images: int) -> None:
        with self.lock:
            self.commands += commands
            self.audio_s += audio_s
            self.images += images


class SessionHandle:
    """The event-loop side of one session: enqueue media, read events.

    The queue to the worker is bounded per session (``EngineConfig.max_inflight_*``):
    a client that sends faster than the worker applies its commands loses camera frames
    first (counted), and past the audio bound its session ends with a fatal
    ``overloaded`` error instead of growing memory; other sessions are not affected.
    """

    def __init__(self, engine: Engine, session_id: str) -> None:
        self.engine = engine
        self.id = session_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.closed = False
        self.inflight = InFlight()

    def _send(self, fn: Callable[[Session], None], audio_s: float = 0.0, images: int = 0) -> None:
        if self.closed:
            raise RuntimeError(f"session {self.id} is closed")
        cfg = self.engine.core.config
        f = self.inflight
        if f.commands >= cfg.max_inflight_commands or (
            audio_s and f.audio_s + audio_s > cfg.max_inflight_audio_s
        ):
            self._overloaded()
            return
        f.add(1, audio_s, images)
        self.engine._submit(self.id, fn, self._applied(audio_s, images))

    def _applied(self, audio_s: float, images: int) -> Callable[[], None]:
        return lambda: self.inflight.add(-1, -audio_s, -images)

    def _overloaded(self) -> None:
        f = self.inflight
        log.warning(
            "session.overloaded",
            session_id=self.id,
            commands=f.commands,
            audio_s=round(f.audio_s, 2),
        )
        self.engine.core.observer.error("overloaded")
        self.queue.put_nowait(
            ErrorEvent(
                "overloaded",
                f"the engine is not keeping up: {f.audio_s:.1f} s of audio and "
                f"{f.commands} messages are still queued; the session is closed",
                fatal=True,
            )
        )
        self.closed = True
        self.engine._cancel(self.id)

    def push_audio(self, pcm: Any, sample_rate: int | None = None, **kw: Any) -> None:
        """Queue PCM (numpy or av.AudioFrame); framing happens on the worker."""
        self._send(
            lambda s: s.push_audio(pcm, sample_rate, **kw),
            audio_s=_duration(pcm, sample_rate, kw.get("channels")),
        )

    def push_image(self, image: Any, time: float) -> None:
        """Queue a camera frame; dropped (and counted) while too many are in flight."""
        if not self.closed and self.inflight.images >= self.engine.core.config.max_inflight_images:
            self.engine.core.observer.dropped("video", 1)
            return
        self._send(lambda s: s.push_image(image, time), images=1)

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
        backend: StepBackend | None = None,
        drafter: Proposer | None = None,
        spec: SpecConfig | None = None,
    ) -> None:
        self.core = EngineCore(
            model, config, vad_model, observer=observer, backend=backend,
            drafter=drafter, spec=spec,
        )  # fmt: skip
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._cancelled: set[str] = set()
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

        self._commands.put(("", lambda _s: do(), None))
        self._wake.set()
        return await fut

    def _deliver(self, h: SessionHandle, ev: Event) -> None:
        h.queue.put_nowait(ev)
        if isinstance(ev, ClosedEvent):
            h.closed = True
            with self._lock:
                self._handles.pop(h.id, None)

    def _submit(
        self, sid: str, fn: Callable[[Session], Any], done: Callable[[], None] | None = None
    ) -> None:
        self._commands.put((sid, fn, done))
        self._wake.set()

    def _cancel(self, sid: str) -> None:
        """Drop the session's queued commands and abort it (called from the event loop)."""
        with self._lock:
            self._cancelled.add(sid)
        self._commands.put(("", lambda _s: self._abort(sid), None))
        self._wake.set()

    def _abort(self, sid: str) -> None:
        with self._lock:
            self._cancelled.discard(sid)
        s = self.core.sessions.get(sid)
        if s is not None and not s.closed:
            s.abort()

    def _apply_commands(self) -> None:
        while True:
            try:
                sid, fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                self._apply(sid, fn)
            finally:
                if done is not None:
                    done()

    def _apply(self, sid: str, fn: Callable[[Session], Any]) -> None:
        if not sid:
            fn(None)  # type: ignore[arg-type]  # engine-level command
            return
        s = self.core.sessions.get(sid)
        if s is None or s.closed or sid in self._cancelled:
            return
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


def _duration(pcm: Any, sample_rate: int | None, channels: int | None = None) -> float:
    """Seconds of audio in ``pcm`` (an ``av.AudioFrame`` or numpy, as the framer takes it)."""
    if isinstance(pcm, av.AudioFrame):
        return float(pcm.samples) / (pcm.sample_rate or 16_000)
    if isinstance(pcm, np.ndarray):
        n = pcm.shape[-1] if pcm.ndim == 2 else pcm.size // (channels or 1)
        return float(n) / (sample_rate or 16_000)
    return 0.0  # the framer rejects it on the worker


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
