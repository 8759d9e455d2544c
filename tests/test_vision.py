"""Vision patching against transformers' goldens, input forms, and the cadence policy."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from rawcast.pipeline import vision
from rawcast.pipeline.media import CELL, CELL_VALUES, PatchGrid
from rawcast.pipeline.vision import (
    SOFT_TOKEN_BUDGETS,
    FrameSampler,
    SamplerConfig,
    VisionInputError,
    patch_image,
    target_size,
)

GOLDEN = Path(__file__).parent / "golden"
SCALE = np.float32(1 / 255)


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_vision_golden", GOLDEN / "make_vision_golden.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
MANIFEST: dict[str, Any] = json.loads((GOLDEN / "vision" / "manifest.json").read_text())


def _smooth_image(height: int, width: int) -> npt.NDArray[np.uint8]:
    y = np.arange(height)[:, None]
    x = np.arange(width)[None, :]
    r = 40 + x * 170 // max(width - 1, 1)
    g = 30 + y * 190 // max(height - 1, 1)
    b = 128 + 60 * np.sin(x / 40.0) * np.cos(y / 30.0)
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)


def _check_counters(sampler: FrameSampler) -> None:
    pending = 1 if sampler.pending else 0
    assert sampler.frames_seen == sampler.frames_dropped + sampler.grids_emitted + pending


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda c: c["name"])
def test_golden_matches_transformers(case: dict[str, Any]) -> None:
    """Cells, positions and grid shape equal Gemma4UnifiedImageProcessor's, bit for bit."""
    img = GEN.make_image(case["width"], case["height"], case["kind"], case["seed"])
    assert GEN.sha256(img) == case["input_sha256"], "input recipe no longer reproduces"
    budget = case["max_soft_tokens"]

    grid = patch_image(img, max_soft_tokens=budget, time=1.5)

    assert (grid.rows, grid.cols) == (case["rows"], case["cols"])
    assert target_size(case["height"], case["width"], budget) == (
        case["rows"] * CELL,
        case["cols"] * CELL,
    )
    # The reference pads to the budget; the grid holds only the real cells.
    assert grid.num_cells == case["num_cells"] == budget - case["padding_rows"]
    with np.load(GOLDEN / "vision" / "positions.npz") as positions:
        np.testing.assert_array_equal(grid.positions, positions[case["name"]])
    with Image.open(GOLDEN / "vision" / f"{case['name']}.png") as png:
        golden_u8 = GEN.image_to_cells(np.asarray(png.convert("RGB")))
    assert grid.cells.dtype == np.float32 and grid.cells.shape == (grid.num_cells, CELL_VALUES)
    levels = np.abs(np.rint(grid.cells * 255).astype(np.int16) - golden_u8).max()
    assert levels == 0, f"cells differ from the reference by up to {levels}/255"
    np.testing.assert_array_equal(grid.cells, golden_u8.astype(np.float32) * SCALE)
    assert grid.time == 1.5


def test_target_size_within_budget() -> None:
    """Every size maps to multiples of 48 within the cell budget, for every budget."""
    rng = np.random.default_rng(7)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, size=(300, 2))]
    sizes += [(1, 1), (1, 10_000), (10_000, 1), (2, 9_999), (47, 48), (48, 48)]
    for budget in SOFT_TOKEN_BUDGETS:
        for h, w in sizes:
            th, tw = target_size(h, w, budget)
            assert th % CELL == 0 and tw % CELL == 0 and th >= CELL and tw >= CELL
            assert (th // CELL) * (tw // CELL) <= budget, (h, w, budget, th, tw)


def test_video_frame_input() -> None:
    """An rgb24 VideoFrame equals the array path; a yuv420p one lands close to it."""
    img = _smooth_image(480, 640)
    reference = patch_image(img)
    frame = av.VideoFrame.from_ndarray(img, format="rgb24")
    np.testing.assert_array_equal(patch_image(frame).cells, reference.cells)

    yuv = frame.reformat(format="yuv420p")
    assert yuv.format.name == "yuv420p"
    grid = patch_image(yuv, time=3.0)
    assert (grid.rows, grid.cols) == (reference.rows, reference.cols) == (14, 19)
    np.testing.assert_array_equal(grid.positions, reference.positions)
    diff = np.abs(grid.cells - reference.cells)
    assert diff.max() <= 6 / 255 and diff.mean() <= 2 / 255
    assert grid.time == 3.0


def test_bgr_input_equals_rgb_swapped() -> None:
    """A BGR array with channel_order="bgr" gives the grid of its RGB twin; frames ignore it."""
    img = GEN.make_image(100, 37, "structured", 5)
    bgr = np.ascontiguousarray(img[..., ::-1])
    rgb_grid = patch_image(img, max_soft_tokens=70)
    np.testing.assert_array_equal(
        patch_image(bgr, max_soft_tokens=70, channel_order="bgr").cells, rgb_grid.cells
    )
    swapped = patch_image(bgr, max_soft_tokens=70)  # read as RGB: red and blue trade places
    cells = rgb_grid.cells.reshape(-1, CELL, CELL, 3)
    np.testing.assert_array_equal(swapped.cells.reshape(-1, CELL, CELL, 3), cells[..., ::-1])
    frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
    np.testing.assert_array_equal(
        patch_image(frame, max_soft_tokens=70, channel_order="bgr").cells, rgb_grid.cells
    )


def test_readonly_and_strided_arrays() -> None:
    """Read-only and non-contiguous arrays are accepted without copies of their own."""
    img = GEN.make_image(64, 40, "structured", 9)
    ro = img.copy()
    ro.flags.writeable = False
    strided = np.zeros((40, 128, 3), np.uint8)
    strided[:, ::2] = img
    expected = patch_image(img, max_soft_tokens=70).cells
    np.testing.assert_array_equal(patch_image(ro, max_soft_tokens=70).cells, expected)
    np.testing.assert_array_equal(patch_image(strided[:, ::2], max_soft_tokens=70).cells, expected)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((4, 4, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((1, 4, 4, 3), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((0, 4, 3), np.uint8), "empty side"),
        (np.zeros((4, 0, 3), np.uint8), "empty side"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_malformed_input_raises(bad: object, match: str) -> None:
    """Malformed pictures raise VisionInputError (a ValueError) in patch_image and offer."""
    with pytest.raises(VisionInputError, match=match):
        patch_image(bad)  # type: ignore[arg-type]
    sampler = FrameSampler()
    with pytest.raises(ValueError, match=match):
        sampler.offer(bad, 0.0)  # type: ignore[arg-type]
    assert sampler.frames_seen == 0


def test_bad_settings_raise() -> None:
    """Budgets outside 70/140/280/560/1120, bad intervals, orders and times are refused."""
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="max_soft_tokens"):
        patch_image(img, max_soft_tokens=100)
    with pytest.raises(ValueError, match="channel_order"):
        patch_image(img, channel_order="rgba")  # type: ignore[arg-type]
    for interval in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="interval_s"):
            SamplerConfig(interval_s=interval)
    with pytest.raises(ValueError, match="max_soft_tokens"):
        SamplerConfig(max_soft_tokens=281)
    with pytest.raises(ValueError, match="finite"):
        FrameSampler().offer(img, math.nan)


def _frames(n: int, fps: int = 30) -> list[tuple[npt.NDArray[np.uint8], float]]:
    """n tiny frames whose constant value is the frame index mod 256, at fps."""
    return [(np.full((8, 8, 3), i % 256, np.uint8), i / fps) for i in range(n)]


def _value(grid: PatchGrid) -> int:
    values = np.unique(np.rint(grid.cells * 255))
    assert len(values) == 1  # a flat picture stays exactly flat through the resize
    return int(values[0])


def test_cadence_30fps_for_10s() -> None:
    """30 fps for 10 s at a 2 s interval gives grids at 0, 2, 4, 6 and 8 s; the rest drop."""
    sampler = FrameSampler(SamplerConfig(interval_s=2.0, max_soft_tokens=70))
    grids = [g for frame, t in _frames(300) if (g := sampler.push(frame, t)) is not None]
    assert [g.time for g in grids] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert [_value(g) for g in grids] == [0, 60, 120, 180, 240]
    assert (sampler.frames_seen, sampler.frames_dropped, sampler.grids_emitted) == (300, 295, 5)
    assert not sampler.pending
    _check_counters(sampler)


def test_newest_due_frame_wins() -> None:
    """Due frames offered before take() replace each other; take() converts only the newest."""
    sampler = FrameSampler(SamplerConfig(interval_s=2.0, max_soft_tokens=70))
    frames = _frames(300)
    for frame, t in frames[:10]:  # no anchor yet: every frame is due
        assert sampler.offer(frame, t)
    grid = sampler.take()
    assert grid is not None and grid.time == frames[9][1] and _value(grid) == 9
    assert sampler.take() is None
    assert (sampler.frames_seen, sampler.frames_dropped, sampler.grids_emitted) == (10, 9, 1)
    assert sampler.next_due == pytest.approx(frames[9][1] + 2.0)

    # A busy worker: frames keep coming past the slot; the last one offered wins.
    results = [sampler.offer(frame, t) for frame, t in frames[10:80]]
    assert results.index(True) == 69 - 10  # frame 69 (2.3 s) is the first due one
    grid = sampler.take()
    assert grid is not None and _value(grid) == 79
    assert (sampler.frames_seen, sampler.frames_dropped, sampler.grids_emitted) == (80, 78, 2)
    _check_counters(sampler)


def test_slow_worker_skips_missed_slots() -> None:
    """A pick late past several slots moves the cadence to the next slot, not a burst."""
    sampler = FrameSampler(SamplerConfig(interval_s=1.0, max_soft_tokens=70))
    frames = _frames(300)
    assert sampler.push(*frames[0]) is not None  # anchor at 0 s
    for frame, t in frames[1:106]:  # 3.5 s of frames, no take
        sampler.offer(frame, t)
    grid = sampler.take()
    assert grid is not None and _value(grid) == 105
    assert sampler.next_due == 4.0  # slots 1, 2, 3 were missed, slot 4 is next
    grids = [g for frame, t in frames[106:150] if (g := sampler.push(frame, t)) is not None]
    assert [_value(g) for g in grids] == [120]
    _check_counters(sampler)


def test_only_picked_frames_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropped frames are never resized or patched."""
    calls: list[float] = []
    real = vision.resize_image

    def counting(image: vision.ImageInput, **kwargs: Any) -> npt.NDArray[np.uint8]:
        calls.append(1.0)
        return real(image, **kwargs)

    monkeypatch.setattr(vision, "resize_image", counting)
    sampler = FrameSampler(SamplerConfig(interval_s=2.0, max_soft_tokens=70))
    for frame, t in _frames(300):
        sampler.offer(frame, t)
        if t % 0.5 == 0:  # the worker comes round every 0.5 s
            sampler.take()
    assert len(calls) == sampler.grids_emitted == 5
    assert sampler.frames_dropped == 295
    _check_counters(sampler)


def test_clock_jump_back_reanchors() -> None:
    """A clock that goes back by more than an interval starts a new cadence; jitter drops."""
    sampler = FrameSampler(SamplerConfig(interval_s=2.0, max_soft_tokens=70))
    frame = np.zeros((8, 8, 3), np.uint8)
    assert sampler.push(frame, 10.0) is not None
    assert sampler.push(frame, 9.5) is None  # small backward jitter: not due
    assert sampler.push(frame, 1.0) is not None  # a new clip
    assert sampler.next_due == 3.0
    assert sampler.push(frame, 2.9) is None
    assert sampler.push(frame, 3.0) is not None
    sampler.offer(frame, 5.0)
    sampler.reset()
    assert not sampler.pending and sampler.next_due is None
    assert (sampler.frames_seen, sampler.frames_dropped, sampler.grids_emitted) == (6, 3, 3)
    _check_counters(sampler)
