"""The vocabulary of what flows through the pipeline.

One time unit everywhere: samples of the 16 kHz audio timeline. Frame k covers
samples [640k, 640k + 640). Seconds are derived from sample counts, never
accumulated from floats, so long streams do not drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 640  # 40 ms: one audio soft token
CELL = 48  # pixels per side of a vision cell
CELL_VALUES = CELL * CELL * 3  # 6912 raw values per cell

Task = Literal["transcribe", "translate", "caption"]


def samples_to_seconds(samples: int) -> float:
    return samples / SAMPLE_RATE


@dataclass(frozen=True, eq=False)
class AudioFrame:
    """Exactly 640 mono float32 samples at 16 kHz.

    ``index`` is the frame number k on the stream's timeline; the frame covers
    samples [640k, 640k + 640). ``discontinuity`` is true on the first frame after
    an input gap longer than the silence-fill limit.
    """

    samples: npt.NDArray[np.float32]
    index: int
    discontinuity: bool = False

    def __post_init__(self) -> None:
        s = self.samples
        if s.dtype != np.float32 or s.shape != (FRAME_SAMPLES,):
            raise ValueError(
                f"AudioFrame needs float32 samples of shape ({FRAME_SAMPLES},), "
                f"got {s.dtype} {s.shape}"
            )
        if self.index < 0:
            raise ValueError(f"AudioFrame index must be >= 0, got {self.index}")

    @property
    def sample_offset(self) -> int:
        return self.index * FRAME_SAMPLES

    @property
    def start(self) -> float:
        return samples_to_seconds(self.sample_offset)

    @property
    def end(self) -> float:
        return samples_to_seconds(self.sample_offset + FRAME_SAMPLES)


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """One picture as Gemma 4 Unified vision cells.

    ``cells``: (n, 6912) float32 in [0, 1], each a 48x48x3 cell in (row, col,
    channel) order, cells in raster order. ``positions``: (n, 2) int64 (x, y).
    ``rows``/``cols``: the grid shape (n == rows * cols). ``time``: media time in
    seconds of the source frame (its pts on the stream's clock).
    """

    cells: npt.NDArray[np.float32]
    positions: npt.NDArray[np.int64]
    rows: int
    cols: int
    time: float = 0.0

    def __post_init__(self) -> None:
        n = self.rows * self.cols
        if self.cells.dtype != np.float32 or self.cells.shape != (n, CELL_VALUES):
            raise ValueError(
                f"PatchGrid cells must be float32 ({n}, {CELL_VALUES}), "
                f"got {self.cells.dtype} {self.cells.shape}"
            )
        if self.positions.shape != (n, 2) or self.positions.dtype != np.int64:
            raise ValueError(
                f"PatchGrid positions must be int64 ({n}, 2), "
                f"got {self.positions.dtype} {self.positions.shape}"
            )

    @property
    def num_cells(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class TextEvent:
    """A piece of text output of one task, with media times from the sample clock.

    ``text`` is the delta for partial events and the whole segment text for final
    ones. ``start_sample``/``end_sample`` are positions on the 16 kHz timeline.
    """

    task: Task
    text: str
    start_sample: int
    end_sample: int
    final: bool
    segment_id: int
    language: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.end_sample < self.start_sample:
            raise ValueError("TextEvent end precedes start")

    @property
    def start(self) -> float:
        return samples_to_seconds(self.start_sample)

    @property
    def end(self) -> float:
        return samples_to_seconds(self.end_sample)


@dataclass(frozen=True)
class SpeechEvent:
    """Voice activity of a stream: ``started`` or ``stopped`` at a sample position."""

    kind: Literal["started", "stopped"]
    sample: int

    @property
    def time(self) -> float:
        return samples_to_seconds(self.sample)


@dataclass(frozen=True)
class ErrorEvent:
    """Something went wrong for this stream; ``fatal`` ones close the session."""

    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True)
class ClosedEvent:
    """The session is closed; no event follows."""

    reason: str = "closed"


Event = TextEvent | SpeechEvent | ErrorEvent | ClosedEvent
