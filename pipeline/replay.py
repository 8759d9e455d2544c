"""Recorded media through one session of an ``EngineCore``, in-process, as fast as it runs.

What ``rawcast transcribe`` and the streamed pass of ``rawcast eval`` do. ``replay``
pushes the media to a session in media order: audio as PyAV frames or as 16 kHz mono
numpy chunks (the session resamples and frames them), pictures as (frame, time) pairs.
The engine is stepped whenever a second of audio is queued, so memory stays bounded for
long inputs; at the end the session is flushed, closed and run until idle. Because the
engine's output depends on the media only, never on chunking or pacing, the events are
those of a live stream of the same media. ``final_text`` keeps each segment's final text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av

from rawcast.pipeline.media import SAMPLE_RATE, ErrorEvent, Event, TextEvent

if TYPE_CHECKING:  # the session pulls in torch: `rawcast --help` imports this module
    from rawcast.pipeline.session import SessionConfig

QUEUED_FRAMES = 25  # step the engine once a second of audio waits


class SessionFailedError(RuntimeError):
    """The session ended with a fatal error event (``code``: the event's code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class Segment:
    start: float  # seconds of media time
    end: float
    text: str
    translation: str | None = None


@dataclass
class Caption:
    time: float
    text: str


def replay(core: Any, media: Iterable[Any], config: SessionConfig) -> list[Event]:
    """Run ``media`` through a new session of ``core`` (an ``EngineCore``); its events.

    Items: ``av.AudioFrame``, a numpy array of 16 kHz mono samples, or ``(picture, time)``.
    """
    s = core.open(config)
    try:
        for item in media:
            if isinstance(item, tuple):
                s.push_image(*item)
            elif isinstance(item, av.AudioFrame):
                s.push_audio(item)
            else:
                s.push_audio(item, SAMPLE_RATE)
            while s.pending_frames() >= QUEUED_FRAMES and not s.closed:
                if not core.step():
                    break
            if s.closed:
                break
        s.flush()
        s.request_close()
        core.run_until_idle()
    finally:
        core.release(s)
    return list(s.outbox)


def final_text(events: Iterable[Event]) -> tuple[list[Segment], list[Caption]]:
    """The final text of each segment (in order, empty ones left out) and the captions.

    Raises ``SessionFailedError`` if the session ended with a fatal error."""
    captions: list[Caption] = []
    by_id: dict[int, Segment] = {}
    for ev in events:
        if isinstance(ev, ErrorEvent) and ev.fatal:
            raise SessionFailedError(ev.code, ev.message)
        if not isinstance(ev, TextEvent) or not ev.final:
            continue
        if ev.task == "caption":
            captions.append(Caption(round(ev.start, 3), ev.text.strip()))
            continue
        seg = by_id.setdefault(ev.segment_id, Segment(round(ev.start, 3), round(ev.end, 3), ""))
        if ev.task == "transcribe":
            seg.text = ev.text.strip()
        elif ev.task == "translate":
            seg.translation = ev.text.strip()
    segments = [by_id[k] for k in sorted(by_id) if by_id[k].text or by_id[k].translation]
    return segments, captions
