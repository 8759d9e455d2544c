"""The pipeline vocabulary refuses malformed units and derives time from sample counts."""

from __future__ import annotations

import numpy as np
import pytest

from rawcast.pipeline.media import AudioFrame, PatchGrid, TextEvent


def test_audio_frame_time_comes_from_its_index() -> None:
    """Frame k covers samples [640k, 640k + 640), even an hour in."""
    k = 25 * 3600
    f = AudioFrame(np.zeros(640, np.float32), index=k)
    assert f.sample_offset == 640 * k
    assert f.start == 3600.0 and f.end == 3600.04


@pytest.mark.parametrize(
    "samples",
    [np.zeros(639, np.float32), np.zeros(640, np.float64), np.zeros((640, 2), np.float32)],
)
def test_audio_frame_rejects_wrong_shape_or_dtype(samples: np.ndarray) -> None:
    """Anything but 640 float32 samples is refused."""
    with pytest.raises(ValueError, match="640"):
        AudioFrame(samples, index=0)


def test_patch_grid_checks_cells_and_positions() -> None:
    """A grid's cells and positions must agree with rows x cols."""
    cells = np.zeros((6, 6912), np.float32)
    pos = np.zeros((6, 2), np.int64)
    g = PatchGrid(cells, pos, rows=2, cols=3)
    assert g.num_cells == 6
    with pytest.raises(ValueError, match="cells"):
        PatchGrid(cells, pos, rows=3, cols=3)
    with pytest.raises(ValueError, match="positions"):
        PatchGrid(cells, pos.astype(np.int32), rows=2, cols=3)


def test_text_event_times() -> None:
    """Event times are sample positions on the 16 kHz clock."""
    e = TextEvent(
        "transcribe", "hi", start_sample=16000, end_sample=24000, final=True, segment_id=1
    )
    assert (e.start, e.end) == (1.0, 1.5)
    with pytest.raises(ValueError):
        TextEvent("transcribe", "x", start_sample=10, end_sample=5, final=False, segment_id=0)
