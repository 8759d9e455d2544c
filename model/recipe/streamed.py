"""The streamed pass of ``rawcast eval``: each held-out clip through the streaming engine.

Each clip goes to a new session of an ``EngineCore`` run in-process, exactly as
``rawcast transcribe`` runs it (``rawcast.pipeline.replay``, default ``EngineConfig``),
in 40 ms chunks as a live stream sends them; transcription and, for clips with a
Spanish reference, translation into Spanish run in the same session. The clip's
streamed text is the final text of its segments, joined. Each scene goes to a camera
session (captions only) as one picture; its caption is the session's final caption.
Each clip is streamed once more with a held-out scene pushed at its middle, captions on,
as a call with a camera runs (the engine appends the picture to the segment amid the
speech): the streamed counterpart of the offline camera pass.

Design decisions:

- VAD on, as ``rawcast transcribe`` and ``rawcast serve`` run by default: Silero
  (``VadConfig()``) opens a segment at speech with a 200 ms pre-roll and ends it after
  400 ms of silence. So the streamed pass scores what a user gets, and it differs from
  the offline pass by what the VAD keeps: leading silence is cut, a long pause would
  split the clip, a missed clip has no text (counted: ``clips_without_speech``,
  ``clips_split``). With ``StreamConfig(vad=False, trail_s=0)`` the engine sees exactly
  the offline audio and its text equals the offline pass's.
- Each clip is followed by ``trail_s`` (1 s) of digital silence, as a live stream goes
  on after the speaker stops, so that the VAD ends the turn (not the end of input).
  ``final_latency_s`` is then the media time from the clip's last word end (its word
  times) to the media position at which the engine queues the final decode (the final
  event's end): the end-of-turn wait a live user sees, compute time excluded. It is
  media time from the events, never wall-clock time.
- No partial decodes (the decode interval is the maximum segment length): they never
  change the final text (decode branches run over the frozen prefix) and would cost
  several decodes per clip, making the streamed pass several times slower than offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rawcast.model.gemma4 import Gemma4Unified
from rawcast.pipeline.engine import EngineCore
from rawcast.pipeline.media import FRAME_SAMPLES, SAMPLE_RATE
from rawcast.pipeline.replay import final_text, replay
from rawcast.pipeline.session import SessionConfig, Tasks
from rawcast.pipeline.vad import SileroModel, VadConfig

LANGUAGE = "Spanish"  # the translation target, as the offline pass asks it


@dataclass(frozen=True)
class StreamConfig:
    vad: bool = True
    trail_s: float = 1.0  # silence after each clip

    def __post_init__(self) -> None:
        if self.trail_s < 0:
            raise ValueError("trail_s must be >= 0")


@dataclass(frozen=True)
class StreamedClip:
    text: str  # final transcripts of the segments, joined
    translation: str | None  # final translations, joined (None: not asked)
    segments: int  # segments with final text
    end: float | None  # media time (s) of the last segment's final text; None: no text


def chunks(audio: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    """40 ms chunks of 16 kHz audio, as a live stream sends them (the last may be short)."""
    return [audio[i : i + FRAME_SAMPLES] for i in range(0, audio.size, FRAME_SAMPLES)]


class ClipStreamer:
    """One engine (its cache and VAD model) for every clip; one session per clip."""

    def __init__(self, model: Gemma4Unified, config: StreamConfig | None = None) -> None:
        self.config = config or StreamConfig()
        self.core = EngineCore(model, vad_model=SileroModel() if self.config.vad else None)
        self._trail = np.zeros(round(self.config.trail_s * SAMPLE_RATE), np.float32)

    def session_config(self, translate: bool, caption: bool = False) -> SessionConfig:
        tasks = Tasks(transcribe=True, translate=LANGUAGE if translate else None, caption=caption)
        max_s = self.core.config.max_segment_s
        return SessionConfig(
            tasks=tasks,
            decode_interval_ms=int(max_s * 1000),  # no partials: see the module docstring
            max_segment_s=max_s,
            vad=VadConfig() if self.config.vad else None,
        )

    def caption(self, picture: npt.NDArray[np.uint8]) -> str:
        """The caption a camera session gets for ``picture`` (shown at media time 0)."""
        config = SessionConfig(tasks=Tasks(transcribe=False, caption=True), vad=None)
        _, captions = final_text(replay(self.core, [(picture, 0.0)], config))
        return " ".join(c.text for c in captions)

    def __call__(
        self,
        audio: npt.NDArray[np.float32],
        translate: bool,
        picture: npt.NDArray[np.uint8] | None = None,
    ) -> StreamedClip:
        """The clip's streamed text; with ``picture``, a camera frame pushed after the
        audio frame at the clip's middle (where the offline camera pass puts it), captions
        on."""
        x = np.concatenate([audio.astype(np.float32), self._trail])
        media: list[Any] = chunks(x)
        if picture is not None:
            half = (audio.size + FRAME_SAMPLES - 1) // FRAME_SAMPLES // 2
            media.insert(half, (picture, half * FRAME_SAMPLES / SAMPLE_RATE))
        config = self.session_config(translate, caption=picture is not None)
        events = replay(self.core, media, config)
        segments, _ = final_text(events)
        return StreamedClip(
            text=" ".join(s.text for s in segments if s.text),
            translation=" ".join(s.translation for s in segments if s.translation)
            if translate
            else None,
            segments=len(segments),
            end=segments[-1].end if segments else None,
        )
