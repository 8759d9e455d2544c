"""Audio framing: any PCM in, exact 640-sample 16 kHz mono float32 frames out.

Design decisions:

- No I/O, no asyncio: ``AudioFramer.push(x) -> list[AudioFrame]`` and ``flush()``;
  all state lives on the framer (``framer.state`` holds the counters).
- Resampling is libswresample through ONE long-lived ``av.AudioResampler``; it is
  replaced only when the input rate, layout or sample format changes, after its
  tail has been drained into the stream, so chunk boundaries never click.
  Downmixing is libswresample's, normalised to unit gain (stereo -> the mean).
- The clock is the count of output samples: frame k covers [640k, 640k + 640).
  Input time is tracked as exact fractions of output samples, never as floats.
  At each drain (format change, flush) the output is padded or trimmed by the
  resampler's rounding (at most a sample or two) so that it holds exactly
  round(input duration x 16000) samples: no drift, whatever the chunking.
- Timestamps (PyAV ``pts``/``time_base``, or numpy ``start_s``/``start_sample``)
  are compared with the sample count, anchored at the first timestamped input.
  Within ``jitter_tolerance_s`` they are ignored. A gap up to ``max_gap_fill_s``
  is filled with silence; an overlap (timestamp behind the stream) up to that
  limit is dropped from the start of the input. Beyond the limit, in either
  direction, nothing is filled or dropped: the timestamps are re-anchored and the
  frame holding the first new sample gets ``discontinuity=True``.
- Malformed input raises ``AudioFormatError`` (a ``ValueError``). PyAV frames:
  u8, s16, s32, flt, dbl, packed or planar, any layout (s64 is rejected); the
  caller's frame is copied, never modified. Numpy input:
  int16, int32 (full scale 2**15, 2**31), float32 and float64 (full scale 1.0);
  other dtypes are rejected. Mono or stereo only (1-D, (n, 1), (n, 2), or 1-D
  interleaved with ``channels=2``); more channels must come as an
  ``av.AudioFrame`` with a named layout, which libswresample downmixes.
  ``sample_rate`` is required for numpy. Float input must be finite with
  |x| <= 16 (larger means int-scaled PCM in a float array); the output is
  clipped to [-1, 1]. Zero-length input is a no-op that returns [].
- ``flush()`` drains the resampler and zero-pads the last partial frame. The
  framer can be pushed to afterwards: indices continue, and the next timestamp
  re-anchors the clock (nothing is filled or dropped across a flush).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from math import floor, isfinite
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from av.audio.frame import format_dtypes

from rawcast.pipeline.media import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame

__all__ = ["FLOAT_LIMIT", "AudioFormatError", "AudioFramer", "FramerConfig", "FramerState"]

FLOAT_LIMIT = 16.0  # |x| above this in float input means int-scaled PCM: rejected
NUMPY_MAX_CHANNELS = 2

_NUMPY_FORMATS: dict[np.dtype[np.generic], str] = {
    np.dtype(np.int16): "s16",
    np.dtype(np.int32): "s32",
    np.dtype(np.float32): "flt",
    np.dtype(np.float64): "dbl",
}
# Normalise the downmix matrix to a gain of at most 1: stereo -> mono is the mean of
# the channels (a mono source carried as two equal channels keeps its level), and
# 5.1 -> mono cannot clip. Without it float output gets L*0.707 + R*0.707.
_SWR_OPTIONS = {"rematrix_maxval": "1.0"}
_FLOAT_FORMATS = frozenset({"flt", "fltp", "dbl", "dblp"})

_Key = tuple[str, str, int]  # (sample format, layout, rate) of one resampler's input


class AudioFormatError(ValueError):
    """Input audio the framer cannot turn into correct frames."""


@dataclass(frozen=True)
class FramerConfig:
    """``max_gap_fill_s``: longest timestamp gap filled with silence (or overlap
    dropped); beyond it the stream is marked discontinuous. ``jitter_tolerance_s``:
    timestamp disagreements up to this are ignored (the timeline stays within it)."""

    max_gap_fill_s: float = 2.0
    jitter_tolerance_s: float = 0.010

    def __post_init__(self) -> None:
        if not (isfinite(self.max_gap_fill_s) and isfinite(self.jitter_tolerance_s)):
            raise ValueError("FramerConfig limits must be finite")
        if not 0 <= self.jitter_tolerance_s <= self.max_gap_fill_s:
            raise ValueError(
                "FramerConfig needs 0 <= jitter_tolerance_s <= max_gap_fill_s, got "
                f"{self.jitter_tolerance_s} and {self.max_gap_fill_s}"
            )


@dataclass
class FramerState:
    """Counters of one stream. Sample counts are 16 kHz output samples."""

    frames_emitted: int = 0
    samples_emitted: int = 0  # frames_emitted * 640, flush padding included
    samples_produced: int = 0  # on the timeline so far: emitted + buffered partial frame
    padded_samples: int = 0  # zeros added by flush() to complete a last frame
    pending_discontinuity: bool = False  # a discontinuity is waiting for its frame
    discontinuities: int = 0  # timestamp jumps beyond max_gap_fill_s
    gaps_filled: int = 0
    filled_samples: int = 0  # silence inserted for gaps
    overlaps: int = 0
    dropped_samples: int = 0  # input dropped because its timestamp was already played
    reconfigurations: int = 0  # resamplers replaced after a rate/layout/format change


@dataclass
class _Buffer:
    pieces: list[npt.NDArray[np.float32]] = field(default_factory=list)
    size: int = 0


class AudioFramer:
    """Turns audio chunks into exact 640-sample 16 kHz mono float32 frames.

    ``push(frame)`` takes an ``av.AudioFrame`` of any sample format, rate and
    layout; its ``pts`` (in ``time_base``, or 1/sample_rate when that is unset)
    is its timestamp. ``push(array, sample_rate, channels=, start_s=,
    start_sample=)`` takes numpy PCM (see the module docstring). Both return the
    frames completed by that input; ``flush()`` returns the rest, zero-padded.
    """

    def __init__(self, config: FramerConfig | None = None) -> None:
        self.config = config or FramerConfig()
        self.state = FramerState()
        self._tolerance = Fraction(self.config.jitter_tolerance_s) * SAMPLE_RATE
        self._limit = Fraction(self.config.max_gap_fill_s) * SAMPLE_RATE
        self._resampler: av.AudioResampler | None = None
        self._key: _Key | None = None
        self._fed = 0  # input samples given to the current resampler (its pts)
        self._in_pos = Fraction(0)  # where the next input sample lands, in output samples
        self._anchor: tuple[Fraction, Fraction] | None = None  # (input time, _in_pos)
        self._marks: list[int] = []  # frame indices that start after a discontinuity
        self._buf = _Buffer()

    @property
    def next_index(self) -> int:
        """Index of the next frame to be emitted."""
        return self.state.frames_emitted

    def push(
        self,
        x: av.AudioFrame | npt.NDArray[np.generic],
        sample_rate: int | None = None,
        *,
        channels: int | None = None,
        start_s: float | None = None,
        start_sample: int | None = None,
    ) -> list[AudioFrame]:
        """Add audio; return the frames it completes (possibly none).

        For numpy input ``sample_rate`` is required; ``channels`` (1 or 2) reads a
        1-D array as interleaved; ``start_s`` (seconds) or ``start_sample`` (input
        samples at ``sample_rate``) is the optional timestamp of its first sample.
        An ``av.AudioFrame`` carries all of that itself.
        """
        if isinstance(x, av.AudioFrame):
            if (sample_rate, channels, start_s, start_sample) != (None, None, None, None):
                raise AudioFormatError(
                    "an av.AudioFrame carries its own rate, layout and pts: pass "
                    "sample_rate/channels/start_s/start_sample only with numpy input"
                )
            frame, t = _from_av(x)
        elif isinstance(x, np.ndarray):
            frame, t = _from_numpy(x, sample_rate, channels, start_s, start_sample)
        else:
            raise AudioFormatError(
                f"expected an av.AudioFrame or a numpy array, got {type(x).__name__}"
            )
        if frame is None:
            return []
        key: _Key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if self._resampler is not None and key != self._key:
            self._drain()
            self.state.reconfigurations += 1
        if self._resampler is None:
            self._resampler = av.AudioResampler(
                format="flt", layout="mono", rate=SAMPLE_RATE, options=_SWR_OPTIONS
            )
            self._key = key
            self._fed = 0
        aligned = self._align(frame, t)
        if aligned is not None:
            self._feed(aligned)
        return self._emit()

    def flush(self) -> list[AudioFrame]:
        """Drain the resampler, zero-pad the last partial frame, return what is left."""
        self._drain()
        pad = -self._buf.size % FRAME_SAMPLES
        if pad:
            self._append(np.zeros(pad, np.float32))
            self.state.padded_samples += pad
        self._in_pos = Fraction(self.state.samples_produced)
        self._anchor = None
        return self._emit()

    # -- internals ---------------------------------------------------------------

    def _align(self, frame: av.AudioFrame, t: Fraction | None) -> av.AudioFrame | None:
        """Apply the timestamp policy; return what of ``frame`` should be fed."""
        if t is None:
            return frame
        if self._anchor is None:
            self._anchor = (t, self._in_pos)
            return frame
        anchor_t, anchor_pos = self._anchor
        delta = anchor_pos + (t - anchor_t) * SAMPLE_RATE - self._in_pos
        if abs(delta) <= self._tolerance:
            return frame
        if abs(delta) > self._limit:
            self._anchor = (t, self._in_pos)
            self._mark_discontinuity()
            return frame
        rate = frame.sample_rate
        n = round(abs(delta) * rate / SAMPLE_RATE)  # in input samples
        if delta > 0:
            before = self._in_pos
            self._feed(_zeros_like(frame, n))
            self.state.gaps_filled += 1
            self.state.filled_samples += round(self._in_pos - before)
            return frame
        self.state.overlaps += 1
        kept = max(frame.samples - n, 0)
        self.state.dropped_samples += round(Fraction((frame.samples - kept) * SAMPLE_RATE, rate))
        return _tail(frame, kept) if kept else None

    def _mark_discontinuity(self) -> None:
        self._marks.append(max(floor(self._in_pos) // FRAME_SAMPLES, self.next_index))
        self.state.discontinuities += 1
        self.state.pending_discontinuity = True

    def _feed(self, frame: av.AudioFrame) -> None:
        """Resample ``frame`` (one of ours, numbered with contiguous pts) into the buffer."""
        assert self._resampler is not None
        rate = frame.sample_rate
        frame.pts, frame.time_base = self._fed, Fraction(1, rate)
        try:
            out = self._resampler.resample(frame)
        except (av.FFmpegError, ValueError) as e:
            raise AudioFormatError(
                f"libswresample rejected {frame.format.name} {frame.layout.name} "
                f"{rate} Hz audio: {e}"
            ) from e
        self._fed += frame.samples
        self._in_pos += Fraction(frame.samples * SAMPLE_RATE, rate)
        for o in out:
            self._append(_samples(o))

    def _drain(self) -> None:
        """Flush the resampler's tail; make the output match the input duration exactly."""
        if self._resampler is None:
            return
        for o in self._resampler.resample(None):
            if o is not None:  # a passthrough resampler echoes the None back
                self._append(_samples(o))
        self._resampler, self._key = None, None
        missing = round(self._in_pos) - self.state.samples_produced
        if missing > 0:
            self._append(np.zeros(missing, np.float32))
        elif missing < 0:
            self._trim(-missing)
        self._in_pos = Fraction(self.state.samples_produced)

    def _append(self, samples: npt.NDArray[np.float32]) -> None:
        np.clip(samples, -1.0, 1.0, out=samples)
        self._buf.pieces.append(samples)
        self._buf.size += samples.size
        self.state.samples_produced += samples.size

    def _trim(self, n: int) -> None:
        """Remove up to ``n`` samples from the end of the not-yet-emitted buffer."""
        n = min(n, self._buf.size)
        if n == 0:
            return
        block = np.concatenate(self._buf.pieces)
        self._buf.pieces = [block[: block.size - n]]
        self._buf.size -= n
        self.state.samples_produced -= n

    def _emit(self) -> list[AudioFrame]:
        count = self._buf.size // FRAME_SAMPLES
        if count == 0:
            return []
        block = np.concatenate(self._buf.pieces)
        rest = block[count * FRAME_SAMPLES :]
        self._buf.pieces = [rest.copy()] if rest.size else []
        self._buf.size = rest.size
        frames = []
        for i in range(count):
            index = self.state.frames_emitted + i
            flagged = bool(self._marks) and min(self._marks) <= index
            if flagged:
                self._marks = [m for m in self._marks if m > index]
            s = block[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]
            frames.append(AudioFrame(s, index, discontinuity=flagged))
        self.state.frames_emitted += count
        self.state.samples_emitted += count * FRAME_SAMPLES
        self.state.pending_discontinuity = bool(self._marks)
        return frames


def _from_av(frame: av.AudioFrame) -> tuple[av.AudioFrame | None, Fraction | None]:
    """Validate a PyAV frame; return a copy of it (None if empty) and its timestamp.

    The copy is ours to renumber, so the caller's frame is never modified.
    """
    if frame.samples == 0:  # e.g. a decoder's empty frame: harmless, whatever its fields
        return None, None
    fmt = frame.format.name
    if fmt not in format_dtypes:
        raise AudioFormatError(
            f"sample format {fmt!r} is not supported; use one of {sorted(format_dtypes)}"
        )
    if frame.sample_rate <= 0:
        raise AudioFormatError(f"av.AudioFrame has no sample rate ({frame.sample_rate})")
    if frame.layout.nb_channels == 0:
        raise AudioFormatError("av.AudioFrame has no channels")
    data = frame.to_ndarray()
    if fmt in _FLOAT_FORMATS:
        _check_float(data)
    own = _make_frame(data, fmt, frame.layout.name, frame.sample_rate)
    if frame.pts is None:
        return own, None
    time_base = frame.time_base or Fraction(1, frame.sample_rate)
    return own, frame.pts * time_base


def _from_numpy(
    x: npt.NDArray[np.generic],
    sample_rate: int | None,
    channels: int | None,
    start_s: float | None,
    start_sample: int | None,
) -> tuple[av.AudioFrame | None, Fraction | None]:
    """Validate numpy PCM; wrap it as a packed av.AudioFrame and its timestamp."""
    if sample_rate is None:
        raise AudioFormatError("numpy input needs sample_rate= (its rate in Hz)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise AudioFormatError(f"sample_rate must be an int, got {sample_rate!r}")
    if sample_rate <= 0:
        raise AudioFormatError(f"sample_rate must be positive, got {sample_rate}")
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    fmt = _NUMPY_FORMATS.get(x.dtype)
    if fmt is None:
        raise AudioFormatError(
            f"unsupported dtype {x.dtype}: use int16, int32, float32 or float64 "
            "(cast int64 to int16 if it holds 16-bit PCM)"
        )
    if x.ndim == 1:
        nch = 1 if channels is None else channels
        if nch >= 1 and x.size % nch:
            raise AudioFormatError(f"{x.size} interleaved values do not divide into {nch} channels")
    elif x.ndim == 2:
        nch = x.shape[1]
        if channels is not None and channels != nch:
            raise AudioFormatError(f"channels={channels} but the array has shape {x.shape}")
    else:
        raise AudioFormatError(
            f"numpy audio must be 1-D or (samples, channels), got shape {x.shape}"
        )
    if not 1 <= nch <= NUMPY_MAX_CHANNELS:
        raise AudioFormatError(
            f"numpy input must have 1 or 2 channels, got {nch} (shape {x.shape}); "
            "arrays are (samples, channels): transpose a (channels, samples) array, "
            "or pass an av.AudioFrame with a named layout such as '5.1' to downmix"
        )
    if start_s is not None and start_sample is not None:
        raise AudioFormatError("give start_s or start_sample, not both")
    if x.size == 0:
        return None, None
    if fmt in _FLOAT_FORMATS:
        _check_float(x)
    layout = "mono" if nch == 1 else "stereo"
    frame = _make_frame(x.reshape(1, -1), fmt, layout, int(sample_rate))
    if start_s is not None:
        if not isfinite(start_s):
            raise AudioFormatError(f"start_s must be finite, got {start_s}")
        return frame, Fraction(start_s)
    if start_sample is not None:
        return frame, Fraction(int(start_sample), int(sample_rate))
    return frame, None


def _check_float(x: npt.NDArray[np.generic]) -> None:
    if not np.isfinite(x).all():
        raise AudioFormatError("float audio contains NaN or infinite values")
    peak = float(np.abs(x).max())
    if peak > FLOAT_LIMIT:
        raise AudioFormatError(
            f"float audio peaks at {peak:g}, above {FLOAT_LIMIT:g}: float PCM is "
            "full scale at 1.0 (int-scaled samples? divide by 32768)"
        )


def _zeros_like(frame: av.AudioFrame, n: int) -> av.AudioFrame:
    """``n`` samples of silence in ``frame``'s format, layout and rate."""
    fmt = frame.format
    nch = frame.layout.nb_channels
    shape = (nch, n) if fmt.is_planar else (1, n * nch)
    value = 128 if fmt.name in ("u8", "u8p") else 0  # unsigned 8-bit silence is mid-scale
    zeros = np.full(shape, value, dtype=format_dtypes[fmt.name])
    return _make_frame(zeros, fmt.name, frame.layout.name, frame.sample_rate)


def _tail(frame: av.AudioFrame, kept: int) -> av.AudioFrame:
    """The last ``kept`` samples of ``frame`` as a new frame."""
    fmt = frame.format
    data = frame.to_ndarray()
    start = frame.samples - kept
    part = data[:, start:] if fmt.is_planar else data[:, start * frame.layout.nb_channels :]
    return _make_frame(part, fmt.name, frame.layout.name, frame.sample_rate)


def _make_frame(data: npt.NDArray[Any], fmt: str, layout: str, rate: int) -> av.AudioFrame:
    """Wrap (planes, values) data of ``fmt``'s dtype as a new av.AudioFrame (a copy)."""
    out = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
    out.sample_rate = rate
    return out


def _samples(frame: av.AudioFrame) -> npt.NDArray[np.float32]:
    """The samples of a flt mono resampler output frame, as a 1-D float32 array."""
    return np.asarray(frame.to_ndarray(), dtype=np.float32).reshape(-1)
