"""Vision patching: pictures to Gemma 4 Unified cells, and the cadence that picks them.

Design decisions:

- Numerics are transformers' ``Gemma4UnifiedImageProcessor`` on CPU, bit for bit
  (tests/test_vision.py checks goldens made by it). Its torchvision resize hands uint8
  CHW straight to torch's native antialiased bicubic kernel on CPU (fixed-point, like
  Pillow), so we call that same kernel: ``F.interpolate(uint8, mode="bicubic",
  antialias=True, align_corners=False)``. That kernel rounds to uint8 between its
  horizontal and vertical passes, so a float resize rounded once at the end differs
  (by up to 30/255 at hard edges on the goldens). On GPU torchvision takes the float
  path, so the reference itself differs by device: this module stays on CPU.
  torchvision itself is not needed (PyPI's build is CUDA-only).
  Scaling is ``u8 * float32(1/255)`` as the reference does it; dividing by 255 differs
  by one ulp on half the values.
- Size: the largest multiple-of-48 frame of the same aspect that fits
  ``max_soft_tokens`` cells (70/140/280/560/1120), upscaling small pictures; a side
  that rounds to 0 becomes one cell and the other ``floor(ratio)`` cells, capped at
  the budget. A picture already at its target size is not resampled.
- Output is a ``PatchGrid`` of the real cells only. The reference pads to the budget
  with zero cells at position (-1, -1); padding is the model input's concern.
- Input: a PyAV ``VideoFrame`` (any pixel format, converted to rgb24 by libswscale) or
  a uint8 (H, W, 3) array in RGB or BGR. Malformed input raises ``VisionInputError``.
- Heavy work is plain synchronous functions (``patch_image``, ``FrameSampler.take``)
  for the engine's worker thread; nothing here touches an event loop.

Cadence policy (``FrameSampler``): one picture every ``interval_s`` of media time, on a
grid anchored at the first picked frame (``anchor + k * interval_s``), so the cadence
does not drift. ``offer(frame, t)`` is cheap (validation only): a frame before the next
slot is dropped at once; a frame at or past it becomes *pending*, replacing (and
dropping) any pending one, so the newest due frame wins. ``take()`` converts the
pending frame, if any, and moves the next slot past its time, skipping slots a slow
worker missed instead of bursting to catch up. Only taken frames are converted, resized
and patched. ``push`` is ``offer`` then ``take`` for single-threaded callers.
Counters: ``frames_seen == frames_dropped + grids_emitted + pending``. A clock that
jumps back by more than one interval re-anchors the cadence (a new clip); smaller
backward jitter is dropped as not due. ``offer`` and ``take`` may run on different
threads (a lock guards the state; conversion runs outside it). Offered arrays are held
by reference until taken or dropped: callers must not reuse their buffers.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import av
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from rawcast.model.config import DEFAULT_SOFT_TOKENS as DEFAULT_SOFT_TOKENS
from rawcast.model.config import SOFT_TOKEN_BUDGETS as SOFT_TOKEN_BUDGETS
from rawcast.pipeline.media import CELL, CELL_VALUES, PatchGrid

_TEACHER_PATCH: Final = 16  # the reference's patch_size; 3x3 of them make one cell
_POOLING: Final = 3
_SCALE: Final = np.float32(1 / 255)  # transformers' rescale_factor, applied in float32
_EPS: Final = 1e-6  # seconds of slack when comparing frame times with cadence slots

ChannelOrder: TypeAlias = Literal["rgb", "bgr"]
ImageInput: TypeAlias = "av.VideoFrame | npt.NDArray[np.uint8]"


class VisionInputError(ValueError):
    """A picture that cannot be patched: wrong type, dtype, shape or an empty side."""


def _check_budget(max_soft_tokens: int) -> None:
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS:
        raise ValueError(
            f"max_soft_tokens must be one of {SOFT_TOKEN_BUDGETS}, got {max_soft_tokens!r}"
        )


def target_size(
    height: int, width: int, max_soft_tokens: int = DEFAULT_SOFT_TOKENS
) -> tuple[int, int]:
    """The resized (height, width): multiples of 48 holding at most ``max_soft_tokens`` cells.

    Same arithmetic, in the same float order, as transformers'
    ``get_aspect_ratio_preserving_size`` (patch 16, pooling 3).
    """
    _check_budget(max_soft_tokens)
    if height < 1 or width < 1:
        raise VisionInputError(f"picture has an empty side: {height}x{width} (HxW)")
    max_patches = max_soft_tokens * _POOLING**2
    target_px = max_patches * _TEACHER_PATCH**2
    factor = math.sqrt(target_px / (height * width))
    th = math.floor(factor * height / CELL) * CELL
    tw = math.floor(factor * width / CELL) * CELL
    max_side = (max_patches // _POOLING**2) * CELL
    if th == 0:
        th, tw = CELL, min(math.floor(width / height) * CELL, max_side)
    elif tw == 0:
        th, tw = min(math.floor(height / width) * CELL, max_side), CELL
    if th * tw > target_px:  # unreachable for positive sizes; the reference checks it too
        raise ValueError(f"{height}x{width} -> {th}x{tw} exceeds {max_soft_tokens} cells")
    return th, tw


def _to_chw(image: ImageInput, channel_order: ChannelOrder) -> npt.NDArray[np.uint8]:
    """A fresh, writable, contiguous RGB uint8 (3, H, W) copy of ``image``."""
    if isinstance(image, av.VideoFrame):
        hwc = image.to_ndarray(format="rgb24")  # always RGB, whatever channel_order says
        order: ChannelOrder = "rgb"
    else:
        hwc = image
        order = channel_order
        _check_array(hwc)
    chw = np.empty((3, hwc.shape[0], hwc.shape[1]), dtype=np.uint8)
    src = hwc.transpose(2, 0, 1)
    chw[...] = src[::-1] if order == "bgr" else src
    return chw


def _check_array(image: object) -> None:
    if not isinstance(image, np.ndarray):
        kind = type(image).__name__
        raise VisionInputError(f"expected an av.VideoFrame or a uint8 numpy array, got {kind}")
    if image.dtype != np.uint8:
        raise VisionInputError(f"picture array must be uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise VisionInputError(f"picture array must have shape (H, W, 3), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise VisionInputError(f"picture has an empty side: shape {image.shape}")


def _check_channel_order(channel_order: str) -> None:
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")


def resize_image(
    image: ImageInput,
    *,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    channel_order: ChannelOrder = "rgb",
) -> npt.NDArray[np.uint8]:
    """The picture resized as the reference does it: RGB uint8 (H', W', 3), H' and W' % 48 == 0."""
    _check_budget(max_soft_tokens)
    _check_channel_order(channel_order)
    chw = _to_chw(image, channel_order)
    th, tw = target_size(chw.shape[1], chw.shape[2], max_soft_tokens)
    if (th, tw) == chw.shape[1:]:
        return chw.transpose(1, 2, 0)
    with torch.inference_mode():
        out = F.interpolate(
            torch.from_numpy(chw).unsqueeze(0),
            size=[th, tw],
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
    return out[0].numpy().transpose(1, 2, 0)


def cells_from_resized(
    resized: npt.NDArray[np.uint8],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], int, int]:
    """(cells, positions, rows, cols) of a resized (rows*48, cols*48, 3) uint8 picture.

    Cells are 48x48x3 in (row, col, channel) order, raster order (y outer, x inner),
    values ``u8 * float32(1/255)``; positions are (x, y).
    """
    h, w, _ = resized.shape
    if h % CELL or w % CELL:
        raise VisionInputError(f"resized picture {h}x{w} is not a multiple of {CELL}")
    rows, cols = h // CELL, w // CELL
    blocks = resized.reshape(rows, CELL, cols, CELL, 3).transpose(0, 2, 1, 3, 4)
    cells = blocks.reshape(rows * cols, CELL_VALUES).astype(np.float32)
    cells *= _SCALE
    idx = np.arange(rows * cols, dtype=np.int64)
    positions = np.stack([idx % cols, idx // cols], axis=1)
    return cells, positions, rows, cols


def patch_image(
    image: ImageInput,
    *,
    time: float = 0.0,
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    channel_order: ChannelOrder = "rgb",
) -> PatchGrid:
    """One picture as a ``PatchGrid`` (real cells only, no padding). Synchronous, CPU-bound.

    ``channel_order`` applies to arrays only; a ``VideoFrame`` is always converted to RGB.
    """
    resized = resize_image(image, max_soft_tokens=max_soft_tokens, channel_order=channel_order)
    cells, positions, rows, cols = cells_from_resized(resized)
    return PatchGrid(cells=cells, positions=positions, rows=rows, cols=cols, time=time)


@dataclass(frozen=True)
class SamplerConfig:
    """How often pictures become grids, and how they are patched."""

    interval_s: float = 2.0
    max_soft_tokens: int = DEFAULT_SOFT_TOKENS
    channel_order: ChannelOrder = "rgb"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"interval_s must be a positive number, got {self.interval_s!r}")
        _check_budget(self.max_soft_tokens)
        _check_channel_order(self.channel_order)


class FrameSampler:
    """The cadence policy: which frames become grids (see the module docstring).

    One per video stream. ``offer`` from the receiving side, ``take`` from the worker;
    or ``push`` for both at once.
    """

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config if config is not None else SamplerConfig()
        self._lock = threading.Lock()
        self._pending: tuple[ImageInput, float] | None = None
        self._anchor: float | None = None  # time of the first picked frame
        self._next_due: float | None = None  # None: the next frame offered is due
        self._last_pick: float | None = None
        self._seen = 0
        self._dropped = 0
        self._emitted = 0

    @property
    def frames_seen(self) -> int:
        return self._seen

    @property
    def frames_dropped(self) -> int:
        return self._dropped

    @property
    def grids_emitted(self) -> int:
        return self._emitted

    @property
    def pending(self) -> bool:
        """Whether a due frame waits for ``take``."""
        return self._pending is not None

    @property
    def next_due(self) -> float | None:
        """Media time of the next cadence slot; None before the first pick."""
        return self._next_due

    def offer(self, frame: ImageInput, time: float) -> bool:
        """Hand over a frame at media time ``time`` (seconds). Cheap: no conversion.

        Returns True when the frame is now pending (due), False when it was dropped.
        """
        if not math.isfinite(time):
            raise ValueError(f"frame time must be finite, got {time!r}")
        if not isinstance(frame, av.VideoFrame):
            _check_array(frame)
        with self._lock:
            self._seen += 1
            if (
                self._next_due is not None
                and self._last_pick is not None
                and time < self._last_pick - self.config.interval_s
            ):
                self._anchor = self._next_due = None  # the clock jumped back: a new clip
            if self._next_due is not None and time < self._next_due - _EPS:
                self._dropped += 1
                return False
            if self._pending is not None:
                self._dropped += 1
            self._pending = (frame, time)
            return True

    def take(self) -> PatchGrid | None:
        """Convert the pending frame to a grid, or return None if none is due."""
        with self._lock:
            if self._pending is None:
                return None
            frame, time = self._pending
            self._pending = None
            interval = self.config.interval_s
            if self._anchor is None:
                self._anchor = time
            slots = math.floor((time - self._anchor + _EPS) / interval) + 1
            self._next_due = self._anchor + slots * interval
            self._last_pick = time
        try:
            grid = patch_image(
                frame,
                time=time,
                max_soft_tokens=self.config.max_soft_tokens,
                channel_order=self.config.channel_order,
            )
        except Exception:
            with self._lock:
                self._dropped += 1
            raise
        with self._lock:
            self._emitted += 1
        return grid

    def push(self, frame: ImageInput, time: float) -> PatchGrid | None:
        """``offer`` then ``take``: a grid when the frame is due, else None."""
        if self.offer(frame, time):
            return self.take()
        return None

    def reset(self) -> None:
        """Forget the cadence and any pending frame (counters are kept)."""
        with self._lock:
            if self._pending is not None:
                self._dropped += 1
            self._pending = None
            self._anchor = self._next_due = self._last_pick = None
