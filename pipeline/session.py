"""One stream: its media timeline, its tasks, its cache slot and its events.

A session turns pushed media into an ordered queue of work items, so that WHAT
the model computes depends only on the media, never on chunk sizes, pacing or
how busy the engine is (streaming equals offline):

- audio is framed (``AudioFramer``) and gated by voice activity (``Vad``):
  frames enter the cache only inside a speech segment (plus a short pre-roll);
- every ``decode_interval_ms`` of segment audio a partial ``Decode`` item is
  queued; at the end of speech (or ``commit()``, ``flush()``, or the segment
  reaching ``max_segment_s``) a final one, then ``EndSegment``;
- a picked video frame (``FrameSampler`` cadence) becomes an ``Image`` item and,
  with captions on, a caption ``Decode``.

Bounded state (invariant 5): the slot holds ONE segment. ``EndSegment`` resets
the slot, so its positions restart at 0 and its memory is bounded by
``max_segment_s`` of audio plus the images in it; a finished segment lives on
only as its final text. Decode branches run in branch buffers over the frozen
prefix and are emptied when they finish.

Everything here runs on the engine's worker thread; nothing is shared between
sessions except the model weights.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch

from rawcast.model.cache import KVCache
from rawcast.model.gemma4 import Append
from rawcast.model.loops import LOOP_RULE, LoopRule, loop_cut
from rawcast.model.prompt import PromptFormat
from rawcast.model.tokenizer import Tokenizer
from rawcast.pipeline.audio import AudioFramer
from rawcast.pipeline.media import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    AudioFrame,
    ClosedEvent,
    ErrorEvent,
    Event,
    PatchGrid,
    SpeechEvent,
    Task,
    TextEvent,
)
from rawcast.pipeline.stabilize import LocalAgreement
from rawcast.pipeline.vad import SileroModel, Vad, VadConfig
from rawcast.pipeline.vision import FrameSampler, SamplerConfig

log = structlog.get_logger(__name__)

TASKS: tuple[Task, ...] = ("transcribe", "translate", "caption")


@dataclass(frozen=True)
class Tasks:
    """Which tasks run: transcription, translation into ``translate``, scene captions."""

    transcribe: bool = True
    translate: str | None = None
    caption: bool = False

    def audio_tasks(self) -> list[tuple[Task, str | None]]:
        out: list[tuple[Task, str | None]] = []
        if self.transcribe:
            out.append(("transcribe", None))
        if self.translate:
            out.append(("translate", self.translate))
        return out


@dataclass(frozen=True)
class SessionConfig:
    tasks: Tasks = field(default_factory=Tasks)
    decode_interval_ms: int = 480
    max_segment_s: float = 30.0
    max_new_tokens: int = 48
    vad: VadConfig | None = field(default_factory=VadConfig)  # None: segments end on commit
    preroll_ms: int = 200
    caption_interval_s: float = 2.0
    max_soft_tokens: int | None = None  # per picture; None: the checkpoint's (EngineCore.open)
    max_pending_s: float = 30.0  # audio waiting for the engine before the oldest is dropped
    # A decode that ends in a repeated block stops there, keeping one copy (model/loops.py);
    # None: decode until the stop token or max_new_tokens, as plain greedy does.
    loop_rule: LoopRule | None = LOOP_RULE

    def __post_init__(self) -> None:
        if self.decode_interval_ms < 40:
            raise ValueError("decode_interval_ms must be at least one frame (40 ms)")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.max_segment_s <= 0:
            raise ValueError("max_segment_s must be > 0")


# --- work items, in media order ---------------------------------------------------------


@dataclass
class FrameItem:
    frame: AudioFrame


@dataclass
class ImageItem:
    grid: PatchGrid


@dataclass
class DecodeItem:
    final: bool
    caption: bool = False  # a caption decode (after an image), else the audio tasks
    sample: int = 0  # media position of the decode point
    queued_at: float = field(default_factory=time.monotonic)  # for latency metrics only


@dataclass
class EndSegmentItem:
    pass


@dataclass
class CloseItem:
    reason: str = "closed"


Item = FrameItem | ImageItem | DecodeItem | EndSegmentItem | CloseItem


@dataclass
class Branch:
    """One task's decode in flight, in its own branch buffer."""

    task: Task
    language: str | None
    buffer: int
    prompt: list[int]
    final: bool
    start_sample: int
    end_sample: int
    queued_at: float = 0.0
    fed: int = 0
    generated: list[int] = field(default_factory=list)
    done: bool = False


class SessionError(RuntimeError):
    pass


class Session:
    """A stream's state. Created and driven by the engine; see the module docstring."""

    def __init__(
        self,
        slot: int,
        branch_buffers: tuple[int, int, int],
        config: SessionConfig,
        tokenizer: Tokenizer,
        vad_model: SileroModel | None,
        emit: Callable[[Event], None] | None = None,
        session_id: str | None = None,
    ) -> None:
        self.id = session_id or uuid.uuid4().hex[:12]
        self.slot = slot
        self.buffers = branch_buffers
        self.config = config
        self.tasks = config.tasks
        self.tok = tokenizer
        self.fmt = PromptFormat(tokenizer)
        self._prefix_ids = tuple(self.fmt.stream_prefix())  # tokenised once, used every row
        self.on_latency: Callable[[str, float], None] = lambda task, seconds: None
        self.on_drop: Callable[[str, int], None] = lambda kind, n: None  # "audio" | "video"
        self.outbox: list[Event] = []  # events, when no ``emit`` callback is given
        self.emit = emit if emit is not None else self.outbox.append
        self.framer = AudioFramer()
        self.vad = Vad(vad_model, config.vad) if (config.vad and vad_model) else None
        if config.vad is not None and vad_model is None:
            raise SessionError("voice activity detection needs the Silero model")
        assert config.max_soft_tokens is not None, "EngineCore.open resolves the budget"
        self.sampler = FrameSampler(
            SamplerConfig(
                interval_s=config.caption_interval_s, max_soft_tokens=config.max_soft_tokens
            )
        )
        self.items: deque[Item] = deque()
        self.closed = False
        # segmentation (intake side)
        self._preroll: deque[AudioFrame] = deque(maxlen=max(1, config.preroll_ms // 40))
        self._in_segment = False
        self._segment_frames = 0
        self._decode_every = max(1, config.decode_interval_ms // 40)
        self._max_frames = int(config.max_segment_s * SAMPLE_RATE / FRAME_SAMPLES)
        self._last_sample = 0
        # cache side
        self.cache_open = False
        self.segment_id = 0
        self._segment_start: int | None = None
        self._segment_end = 0
        self.branches: list[Branch] = []
        self._stabilizers = {t: LocalAgreement() for t in TASKS}
        self._captions = 0
        # counters
        self.frames_in = 0
        self.frames_appended = 0
        self.frames_dropped = 0
        self.decodes = 0

    # --- intake: runs on the worker thread, in push order --------------------------------

    def push_audio(self, pcm: Any, sample_rate: int | None = None, **kw: Any) -> None:
        for f in self.framer.push(pcm, sample_rate, **kw):
            self._on_frame(f)
        self._bound_pending()

    def push_image(self, image: Any, time: float) -> None:
        if not self.tasks.caption:
            return
        before = self.sampler.frames_dropped
        grid = self.sampler.push(image, time)
        if self.sampler.frames_dropped > before:
            self.on_drop("video", self.sampler.frames_dropped - before)
        if grid is not None:
            self.items.append(ImageItem(grid))
            self.items.append(DecodeItem(final=True, caption=True, sample=_sample(time)))
            if not self._in_segment:
                self.items.append(EndSegmentItem())

    def commit(self) -> None:
        """End the current segment now (manual turn detection)."""
        if self._in_segment:
            self._end_segment()

    def flush(self) -> None:
        """End of input: drain the framer and finish the open segment."""
        for f in self.framer.flush():
            self._on_frame(f)
        if self._in_segment:
            self._end_segment()

    def configure(self, tasks: Tasks) -> None:
        self.tasks = tasks

    def set_vad(self, vad: Vad | None) -> None:
        """Switch voice activity detection on (a ``Vad``) or off (segments end on commit)."""
        self.vad = vad

    def clear(self) -> None:
        """Discard audio not yet decoded (queued frames and the open segment's audio).

        Frames already appended to the cache are dropped with the segment: the slot is
        reset before the next media, no final text is produced for the cleared audio.
        """
        kept: deque[Item] = deque(i for i in self.items if isinstance(i, ImageItem | CloseItem))
        self.items = kept
        self.items.appendleft(EndSegmentItem())
        self._in_segment = False
        self._preroll.clear()
        if self.vad is not None:
            self.vad.reset()

    def request_close(self, reason: str = "closed") -> None:
        self.items.append(CloseItem(reason))

    def abort(self) -> None:
        """Close without finishing: queued media is dropped, a decode in flight ends first."""
        self.items.clear()
        self._in_segment = False
        self.items.append(CloseItem("aborted"))

    def _on_frame(self, f: AudioFrame) -> None:
        self.frames_in += 1
        self._last_sample = f.sample_offset + FRAME_SAMPLES
        if self.vad is None:
            if not self._in_segment:
                self._begin_segment([f])
            else:
                self._add_frame(f)
            return
        r = self.vad.push(f.samples)
        if not self._in_segment:
            self._preroll.append(f)
            if r.started:
                frames = list(self._preroll)
                self._preroll.clear()
                self._begin_segment(frames)
            return
        self._add_frame(f)
        if r.ended:
            self._end_segment(noise=r.noise)

    def _begin_segment(self, frames: list[AudioFrame]) -> None:
        self._in_segment = True
        self._segment_frames = 0
        self.emit(SpeechEvent("started", frames[0].sample_offset))
        for f in frames:
            self._add_frame(f)

    def _add_frame(self, f: AudioFrame) -> None:
        self.items.append(FrameItem(f))
        self._segment_frames += 1
        end = f.sample_offset + FRAME_SAMPLES
        if self._segment_frames >= self._max_frames:
            self._end_segment()
        elif self._segment_frames % self._decode_every == 0 and self.tasks.audio_tasks():
            self.items.append(DecodeItem(final=False, sample=end))

    def _end_segment(self, noise: bool = False) -> None:
        self._in_segment = False
        if self.vad is not None:
            self.vad.reset()
        self.emit(SpeechEvent("stopped", self._last_sample))
        if not noise:
            self.items.append(DecodeItem(final=True, sample=self._last_sample))
        self.items.append(EndSegmentItem())

    def _bound_pending(self) -> None:
        limit = int(self.config.max_pending_s * SAMPLE_RATE / FRAME_SAMPLES)
        pending = self.pending_frames()
        if pending <= limit:
            return
        # Explicit policy: the engine is too slow for this stream; drop the OLDEST queued
        # audio frames (never silently: counted, logged and reported to the client).
        drop = pending - limit
        kept: deque[Item] = deque()
        for it in self.items:
            if drop and isinstance(it, FrameItem):
                drop -= 1
                continue
            kept.append(it)
        dropped = pending - limit
        self.items = kept
        self.frames_dropped += dropped
        self.on_drop("audio", dropped)
        log.warning("audio.dropped", session_id=self.id, frames=dropped, reason="engine behind")
        self.emit(ErrorEvent("overloaded", f"engine behind: dropped {dropped * 40} ms of audio"))

    # --- engine side: rows for this tick, and their results -------------------------------

    def pending_frames(self) -> int:
        return sum(isinstance(i, FrameItem) for i in self.items)

    def has_work(self) -> bool:
        return bool(self.branches) or bool(self.items)

    def next_rows(self, cache: KVCache, max_frames: int) -> list[Append]:
        """This session's rows for the next forward (empty: nothing to do now)."""
        if self.branches:
            return self._branch_rows()
        while self.items:
            head = self.items[0]
            if isinstance(head, FrameItem | ImageItem) and not self._room_for(head, cache):
                # The slot is full (a long segment with many images): cut the segment here,
                # decode its final text, and continue the media in a fresh segment.
                self.items.extendleft(
                    [EndSegmentItem(), DecodeItem(final=True, sample=self._segment_end)]
                )
                continue
            if isinstance(head, FrameItem):
                return [self._frames_row(max_frames, cache)]
            if isinstance(head, ImageItem):
                self.items.popleft()
                return [self._image_row(head.grid)]
            if isinstance(head, DecodeItem):
                self.items.popleft()
                if self._open_branches(head, cache):
                    return self._branch_rows()
                continue
            if isinstance(head, EndSegmentItem):
                self.items.popleft()
                self._reset_slot(cache)
                continue
            self.items.popleft()
            self.close(cache, head.reason)
            return []
        return []

    def _room_for(self, head: Item, cache: KVCache) -> bool:
        if not self.cache_open:
            return True  # a fresh segment always takes one item
        need = 1 if isinstance(head, FrameItem) else 0
        if isinstance(head, ImageItem):
            need = len(self.fmt.image_block(head.grid.num_cells))
        return cache.length(self.slot) + need <= cache.full_capacity

    def _prefix(self) -> list[int]:
        if self.cache_open:
            return []
        self.cache_open = True
        return list(self._prefix_ids)

    def _frames_row(self, max_frames: int, cache: KVCache) -> Append:
        frames: list[AudioFrame] = []
        room = cache.full_capacity - cache.length(self.slot) - len(self._prefix_ids)
        max_frames = max(1, min(max_frames, room))
        while self.items and isinstance(self.items[0], FrameItem) and len(frames) < max_frames:
            item = self.items.popleft()
            assert isinstance(item, FrameItem)
            frames.append(item.frame)
        if self._segment_start is None:
            self._segment_start = frames[0].sample_offset
        self._segment_end = frames[-1].sample_offset + FRAME_SAMPLES
        self.frames_appended += len(frames)
        audio = torch.from_numpy(np.stack([f.samples for f in frames]))
        tokens = [*self._prefix(), *([self.tok.ids.audio] * len(frames))]
        return Append(self.slot, tokens, audio=audio)

    def _image_row(self, grid: PatchGrid) -> Append:
        tokens = [*self._prefix(), *self.fmt.image_block(grid.num_cells)]
        cells = torch.from_numpy(grid.cells)
        pos = torch.from_numpy(grid.positions)
        return Append(self.slot, tokens, images=[(cells, pos)])

    def _open_branches(self, item: DecodeItem, cache: KVCache) -> bool:
        if not self.cache_open:
            return False
        if item.caption:
            if not self.tasks.caption:
                return False
            wanted: list[tuple[Task, str | None]] = [("caption", None)]
        else:
            wanted = self.tasks.audio_tasks()
        start = self._segment_start if self._segment_start is not None else item.sample
        for i, (task, lang) in enumerate(wanted):
            buf = self.buffers[i]
            cache.reset_branch(buf)
            self.branches.append(
                Branch(
                    task=task,
                    language=lang,
                    buffer=buf,
                    prompt=self.fmt.branch(task, lang),
                    final=item.final,
                    start_sample=item.sample if item.caption else start,
                    end_sample=item.sample if item.caption else self._segment_end,
                    queued_at=item.queued_at,
                )
            )
        self.decodes += 1
        return bool(self.branches)

    def _branch_rows(self) -> list[Append]:
        rows = []
        for b in self.branches:
            if b.done:
                continue
            if b.fed == 0:
                rows.append(Append(self.slot, b.prompt, branch=b.buffer))
            else:
                rows.append(Append(self.slot, [b.generated[-1]], branch=b.buffer))
        return rows

    def branch(self, buffer: int) -> Branch | None:
        """The open branch decoding in ``buffer`` (None if there is none)."""
        return next((b for b in self.branches if b.buffer == buffer and not b.done), None)

    def on_token(self, row: Append, token: int, cache: KVCache) -> None:
        """The greedy token predicted after ``row`` (a branch row of this session)."""
        self.on_tokens(row, [token], cache)

    def on_tokens(self, row: Append, tokens: Sequence[int], cache: KVCache) -> None:
        """Greedy tokens emitted after ``row``, in order: one after a plain row, several
        after a speculative verify row (``model/speculative.py``), whose accepted tokens
        are in the branch buffer now. Token j is handled as plain greedy decoding would
        handle it, one row per token: the buffer then held ``len(tokens) - 1 - j`` fewer
        tokens than it does now. Tokens after the branch is done are ignored."""
        b = next(x for x in self.branches if x.buffer == row.branch)
        end = cache.branch_length(b.buffer) - len(tokens)
        for j, token in enumerate(tokens):
            if b.done:
                return
            b.fed = end + j + 1  # tokens in the buffer when plain greedy emits this one
            stop = token in self.fmt.stop_ids
            if not stop:
                b.generated.append(token)
                cut = self._loop_cut(b.generated)
                if cut is not None:
                    del b.generated[cut:]
                    stop = True
            room = cache.spec.branch_room - b.fed
            if stop or len(b.generated) >= self.config.max_new_tokens or room < 1:
                b.done = True
            if all(x.done for x in self.branches):
                self._finish_branches(cache)

    def _loop_cut(self, generated: list[int]) -> int | None:
        rule = self.config.loop_rule
        return None if rule is None else loop_cut(generated, rule)

    def _finish_branches(self, cache: KVCache) -> None:
        for b in self.branches:
            cache.reset_branch(b.buffer)
            text = self.tok.decode(b.generated).strip()
            self._emit_text(b, text)
        self.branches = []

    def _emit_text(self, b: Branch, text: str) -> None:
        if b.final:
            self.on_latency(b.task, time.monotonic() - b.queued_at)
        if b.task == "caption":
            self._captions += 1
            self.emit(
                TextEvent("caption", text, b.start_sample, b.end_sample, True, self._captions)
            )
            return
        stab = self._stabilizers[b.task]
        if b.final:
            self.emit(
                TextEvent(
                    b.task,
                    text,
                    b.start_sample,
                    b.end_sample,
                    True,
                    self.segment_id,
                    language=b.language,
                )
            )
            return
        delta = stab.update(text)
        if delta:
            self.emit(
                TextEvent(
                    b.task,
                    delta,
                    b.start_sample,
                    b.end_sample,
                    False,
                    self.segment_id,
                    language=b.language,
                )
            )

    def _reset_slot(self, cache: KVCache) -> None:
        cache.reset(self.slot)
        self.cache_open = False
        self._segment_start = None
        self.segment_id += 1
        for s in self._stabilizers.values():
            s.reset()

    def fail(self, cache: KVCache, code: str, message: str) -> None:
        self.emit(ErrorEvent(code, message, fatal=True))
        self.close(cache, "error")

    def close(self, cache: KVCache, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        for b in self.branches:
            cache.reset_branch(b.buffer)
        self.branches = []
        self.items.clear()
        cache.reset(self.slot)
        for buf in self.buffers:
            cache.reset_branch(buf)
        log.info(
            "session.summary",
            session_id=self.id,
            reason=reason,
            frames_in=self.frames_in,
            frames_appended=self.frames_appended,
            frames_dropped=self.frames_dropped,
            decodes=self.decodes,
            segments=self.segment_id,
        )
        self.emit(ClosedEvent(reason))


def _sample(time: float) -> int:
    return max(0, round(time * SAMPLE_RATE))
