"""The audio framing stage: exact 16 kHz frames, a sample-counted clock, gaps, formats."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import numpy.typing as npt
import pytest

from rawcast.pipeline.audio import AudioFormatError, AudioFramer, FramerConfig
from rawcast.pipeline.media import FRAME_SAMPLES, SAMPLE_RATE, AudioFrame

F32 = npt.NDArray[np.float32]


def _sine(freq: float, seconds: float, rate: int, amp: float = 0.5, channels: int = 2) -> F32:
    t = np.arange(round(seconds * rate)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1)


def _concat(frames: list[AudioFrame]) -> F32:
    return np.concatenate([f.samples for f in frames]) if frames else np.zeros(0, np.float32)


def _push_chunked(framer: AudioFramer, x: F32, rate: int, seed: int = 0) -> list[AudioFrame]:
    """Push ``x`` in seeded random chunks of 1 to 5000 samples, then flush."""
    rng = np.random.default_rng(seed)
    out: list[AudioFrame] = []
    i = 0
    while i < len(x):
        n = int(rng.integers(1, 5001))
        out += framer.push(x[i : i + n], rate)
        i += n
    return out + framer.flush()


def _av_frame(data: npt.NDArray[np.generic], fmt: str, layout: str, rate: int) -> av.AudioFrame:
    """A PyAV frame from (samples, channels) data, planar or packed as ``fmt`` wants."""
    planar = av.AudioFormat(fmt).is_planar
    arr = np.ascontiguousarray(data.T if planar else data.reshape(1, -1))
    frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout=layout)
    frame.sample_rate = rate
    return frame


def _packets(seconds: float, rate: int = 48_000, size: int = 960) -> list[av.AudioFrame]:
    """20 ms s16 stereo packets of a 440 Hz tone, pts in 1/rate, contiguous."""
    x = (_sine(440, seconds, rate) * 32767).astype(np.int16)
    frames = []
    for start in range(0, len(x) - size + 1, size):
        f = _av_frame(x[start : start + size], "s16", "stereo", rate)
        f.pts, f.time_base = start, Fraction(1, rate)
        frames.append(f)
    return frames


def _check_indices(frames: list[AudioFrame]) -> None:
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.sample_offset == FRAME_SAMPLES * f.index for f in frames)
    assert all(f.samples.dtype == np.float32 and f.samples.shape == (640,) for f in frames)


def _peak_frequency(x: F32, rate: int) -> float:
    """Frequency of the strongest tone, by a Hann-windowed FFT with parabolic interpolation."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / len(x)


def test_chunked_48k_stereo_sine_has_right_length_pitch_and_no_clicks() -> None:
    """A 48 kHz stereo 440 Hz tone in random chunks keeps its duration, pitch and continuity."""
    seconds, freq, amp = 4.0, 440.0, 0.5
    x = _sine(freq, seconds, 48_000, amp)
    framer = AudioFramer()
    frames = _push_chunked(framer, x, 48_000)
    _check_indices(frames)
    assert abs(len(frames) - seconds * SAMPLE_RATE / FRAME_SAMPLES) <= 1
    y = _concat(frames)[: int(seconds * SAMPLE_RATE)]
    assert abs(_peak_frequency(y, SAMPLE_RATE) - freq) < 1.0
    # A sine's sample-to-sample step is at most 2*pi*f*A/fs; a click would exceed it.
    bound = 2 * np.pi * freq * amp / SAMPLE_RATE
    assert np.abs(np.diff(y)).max() < 1.05 * bound
    assert np.abs(y).max() == pytest.approx(amp, abs=0.01)


def test_chunked_output_equals_one_piece_output() -> None:
    """Streaming in any chunk sizes gives the same samples as one push of the whole input."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3 * 44_100, 2)) * 0.1).astype(np.float32)
    whole = AudioFramer()
    offline = whole.push(x, 44_100) + whole.flush()
    for seed in (1, 2):
        streamed = _push_chunked(AudioFramer(), x, 44_100, seed=seed)
        assert len(streamed) == len(offline)
        np.testing.assert_allclose(_concat(streamed), _concat(offline), rtol=0, atol=1e-6)


def test_three_hour_stream_at_44k1_does_not_drift() -> None:
    """Three hours of 44.1 kHz audio (timestamped 60 s chunks) give exactly 3 h x 16000 samples."""
    rate, chunk_s, chunks = 44_100, 60, 180
    chunk = np.random.default_rng(3).integers(-300, 300, chunk_s * rate).astype(np.int16)
    framer = AudioFramer()
    n_frames = 0
    for i in range(chunks):
        n_frames += len(framer.push(chunk, rate, start_sample=i * len(chunk)))
    expected = chunks * chunk_s * SAMPLE_RATE
    # Before the flush only the resampler's fixed delay (a few dozen samples) is missing.
    assert expected - 64 <= framer.state.samples_produced <= expected
    n_frames += len(framer.flush())
    state = framer.state
    assert state.samples_produced - state.padded_samples == expected
    assert n_frames == state.frames_emitted == expected // FRAME_SAMPLES
    assert state.gaps_filled == state.overlaps == state.discontinuities == 0


def test_pts_gap_of_300_ms_is_filled_with_silence() -> None:
    """A 300 ms pts jump between packets inserts 300 ms of zeros; the count stays exact."""
    packets = _packets(2.0)
    framer = AudioFramer()
    out: list[AudioFrame] = []
    for i, p in enumerate(packets):
        if i >= 50:  # after 1 s, the sender's clock jumps 300 ms ahead
            p.pts = (p.pts or 0) + 14_400
        out += framer.push(p)
    out += framer.flush()
    s = framer.state
    assert (s.gaps_filled, s.filled_samples, s.discontinuities) == (1, 4_800, 0)
    assert s.samples_produced - s.padded_samples == 32_000 + 4_800
    y = _concat(out)
    assert np.abs(y[16_000 + 100 : 16_000 + 4_800 - 100]).max() < 1e-3  # the silence
    assert np.abs(y[16_000 + 4_800 + 100 : 16_000 + 4_800 + 740]).max() > 0.4  # tone resumes
    assert not any(f.discontinuity for f in out)


def test_gap_beyond_limit_marks_discontinuity_and_fills_nothing() -> None:
    """A 3 s pts jump (limit 2 s) fills nothing and flags the first frame after the jump."""
    packets = _packets(2.0)
    framer = AudioFramer(FramerConfig(max_gap_fill_s=2.0))
    out: list[AudioFrame] = []
    for i, p in enumerate(packets):
        if i >= 50:
            p.pts = (p.pts or 0) + 3 * 48_000
        if i == 50:
            assert not framer.state.pending_discontinuity
        out += framer.push(p)
        if i == 50:
            assert framer.state.pending_discontinuity
    out += framer.flush()
    s = framer.state
    assert (s.gaps_filled, s.filled_samples, s.discontinuities) == (0, 0, 1)
    assert s.samples_produced - s.padded_samples == 32_000
    assert [f.index for f in out if f.discontinuity] == [25]  # 1 s = 25 frames before it
    assert not s.pending_discontinuity
    _check_indices(out)


def test_small_jitter_does_not_fill() -> None:
    """Packet timestamps wobbling by up to 3 ms around the true time change nothing."""
    rng = np.random.default_rng(5)
    packets = _packets(2.0)
    reference = AudioFramer()
    expected = [f for p in packets for f in reference.push(p)] + reference.flush()
    framer = AudioFramer()
    out: list[AudioFrame] = []
    for p in packets:
        p.pts = (p.pts or 0) + int(rng.integers(-144, 145))
        out += framer.push(p)
    out += framer.flush()
    s = framer.state
    assert s.gaps_filled == s.overlaps == s.discontinuities == 0
    np.testing.assert_array_equal(_concat(out), _concat(expected))


def test_overlapping_timestamps_drop_the_repeated_part() -> None:
    """Input whose timestamp is behind the stream is trimmed; a wholly old chunk is dropped."""
    x = _sine(440, 1.0, 16_000, channels=1)
    framer = AudioFramer()
    out = framer.push(x[:8_000], 16_000, start_s=0.0)
    out += framer.push(x[6_400:], 16_000, start_s=0.4)  # repeats 100 ms
    out += framer.push(x[:1_600], 16_000, start_s=0.0)  # all in the past
    out += framer.flush()
    s = framer.state
    assert (s.overlaps, s.dropped_samples, s.gaps_filled) == (2, 1_600 + 1_600, 0)
    np.testing.assert_array_equal(_concat(out), x[:, 0])


def test_timestamps_jumping_back_beyond_limit_restart_the_clock() -> None:
    """A backwards jump beyond the limit (a source restart) keeps the audio and flags it."""
    x = np.full(16_000, 0.25, np.float32)
    framer = AudioFramer()
    framer.push(x, 16_000, start_s=100.0)
    out = framer.push(x, 16_000, start_s=10.0)
    out += framer.push(x, 16_000, start_s=11.0)  # contiguous on the new clock
    s = framer.state
    assert (s.discontinuities, s.overlaps, s.dropped_samples) == (1, 0, 0)
    assert s.samples_produced == 48_000
    assert [f.index for f in out if f.discontinuity] == [25]


def test_numpy_start_time_gap_is_filled() -> None:
    """numpy pushes with start_s/start_sample fill gaps too, at any input rate."""
    x = np.full((8_000, 1), 0.25, np.float32)
    framer = AudioFramer()
    framer.push(x, 8_000, start_s=10.0)  # the first timestamp is the origin
    framer.push(x, 8_000, start_sample=90_400)  # 11.3 s: 300 ms late
    framer.flush()
    s = framer.state
    assert (s.gaps_filled, s.filled_samples) == (1, 4_800)
    assert s.samples_produced - s.padded_samples == 16_000 + 4_800 + 16_000


def test_rate_and_layout_changes_keep_the_timeline_exact() -> None:
    """48 kHz stereo -> 44.1 kHz stereo -> 8 kHz mono: output length is the input duration."""
    parts = [(48_000, 1.0, 2), (44_100, 1.5, 2), (8_000, 0.7, 1)]
    framer = AudioFramer()
    out: list[AudioFrame] = []
    for seed, (rate, seconds, channels) in enumerate(parts):
        x = _sine(300, seconds, rate, channels=channels)
        rng = np.random.default_rng(seed)
        i = 0
        while i < len(x):
            n = int(rng.integers(1, 5001))
            out += framer.push(x[i : i + n], rate)
            i += n
    out += framer.flush()
    s = framer.state
    assert s.reconfigurations == 2
    assert s.padded_samples == 0
    assert s.samples_produced == round(sum(sec for _, sec, _ in parts) * SAMPLE_RATE) == 51_200
    _check_indices(out)
    # The tone carries on across each change: no dropout at the boundaries.
    y = _concat(out)
    for boundary in (16_000, 40_000):
        assert np.abs(y[boundary - 40 : boundary + 40]).max() > 0.3


def test_pyav_formats_match_equivalent_numpy() -> None:
    """s16, s16p, s32, s32p, flt, fltp, dbl, dblp frames give the numpy int16 stream's output."""
    x16 = (np.random.default_rng(9).standard_normal((24_000, 2)) * 3_000).astype(np.int16)
    ref_framer = AudioFramer()
    reference = _concat(ref_framer.push(x16, 48_000) + ref_framer.flush())
    as_float = x16.astype(np.float32) / 32_768
    data: dict[str, npt.NDArray[np.generic]] = {
        "s16": x16,
        "s32": x16.astype(np.int32) << 16,
        "flt": as_float,
        "dbl": as_float.astype(np.float64),
    }
    for base, values in data.items():
        for fmt in (base, base + "p"):
            frame = _av_frame(values, fmt, "stereo", 48_000)
            framer = AudioFramer()
            y = _concat(framer.push(frame) + framer.flush())
            np.testing.assert_allclose(y, reference, rtol=0, atol=1e-6, err_msg=fmt)


def test_pyav_multichannel_layouts_are_downmixed() -> None:
    """A 5.1 PyAV frame with a tone on every channel becomes a mono tone of the same pitch."""
    x = _sine(1_000, 1.0, 48_000, amp=0.2, channels=6)
    framer = AudioFramer()
    y = _concat(framer.push(_av_frame(x, "fltp", "5.1", 48_000)) + framer.flush())
    assert len(y) == 16_000
    assert abs(_peak_frequency(y, SAMPLE_RATE) - 1_000) < 1.0
    assert np.abs(y).max() > 0.1


def test_pushed_pyav_frame_is_not_modified() -> None:
    """The framer renumbers its own copy; the caller's pts and time_base are untouched."""
    frame = _av_frame(np.zeros((960, 2), np.int16), "s16", "stereo", 48_000)
    frame.pts, frame.time_base = 123_456, Fraction(1, 1_000)
    AudioFramer().push(frame)
    assert (frame.pts, frame.time_base) == (123_456, Fraction(1, 1_000))


def test_numpy_layouts_are_equivalent() -> None:
    """(n, 2) stereo equals 1-D interleaved with channels=2; (n, 1) equals 1-D mono."""
    x = _sine(440, 0.5, 22_050)
    a, b = AudioFramer(), AudioFramer()
    stereo = _concat(a.push(x, 22_050) + a.flush())
    interleaved = _concat(b.push(x.reshape(-1), 22_050, channels=2) + b.flush())
    np.testing.assert_array_equal(stereo, interleaved)
    c, d = AudioFramer(), AudioFramer()
    column = _concat(c.push(x[:, :1], 22_050) + c.flush())
    flat = _concat(d.push(np.ascontiguousarray(x[:, 0]), 22_050) + d.flush())
    np.testing.assert_array_equal(column, flat)


@pytest.mark.parametrize(
    ("x", "kwargs", "message"),
    [
        (np.zeros(100, np.int64), {"sample_rate": 16_000}, "unsupported dtype int64"),
        (np.zeros(100, np.uint8), {"sample_rate": 16_000}, "unsupported dtype uint8"),
        (np.array([0.0, np.nan], np.float32), {"sample_rate": 16_000}, "NaN or infinite"),
        (np.array([0.0, np.inf], np.float64), {"sample_rate": 16_000}, "NaN or infinite"),
        (np.full(10, 1_000.0, np.float32), {"sample_rate": 16_000}, "full scale at 1.0"),
        (np.zeros((100, 8), np.float32), {"sample_rate": 16_000}, "1 or 2 channels, got 8"),
        (np.zeros((2, 4_800), np.float32), {"sample_rate": 48_000}, "transpose"),
        (np.zeros((2, 3, 4), np.float32), {"sample_rate": 16_000}, "1-D or (samples, channels)"),
        (np.zeros(101, np.int16), {"sample_rate": 16_000, "channels": 2}, "into 2 channels"),
        (np.zeros((10, 2), np.int16), {"sample_rate": 16_000, "channels": 1}, "channels=1"),
        (np.zeros(100, np.float32), {}, "needs sample_rate"),
        (np.zeros(100, np.float32), {"sample_rate": 0}, "must be positive"),
        (np.zeros(100, np.float32), {"sample_rate": 16_000.0}, "must be an int"),
        (
            np.zeros(100, np.float32),
            {"sample_rate": 16_000, "start_s": 0.0, "start_sample": 0},
            "not both",
        ),
        ([0.0] * 100, {"sample_rate": 16_000}, "got list"),
    ],
)
def test_malformed_input_raises_a_clear_error(
    x: object, kwargs: dict[str, object], message: str
) -> None:
    """Bad dtypes, values, shapes and arguments raise AudioFormatError naming the problem."""
    framer = AudioFramer()
    with pytest.raises(AudioFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        framer.push(x, **kwargs)  # type: ignore[arg-type]  # deliberately malformed


def test_malformed_pyav_frames_raise_a_clear_error() -> None:
    """PyAV frames with NaN or an unsupported format, or numpy-only arguments, raise."""
    bad = _av_frame(np.array([[0.0, np.nan]], np.float32), "fltp", "stereo", 48_000)
    with pytest.raises(AudioFormatError, match="NaN"):
        AudioFramer().push(bad)
    s64 = av.AudioFrame(format="s64", layout="mono", samples=10)
    s64.sample_rate = 16_000
    with pytest.raises(AudioFormatError, match="'s64' is not supported"):
        AudioFramer().push(s64)
    good = _av_frame(np.zeros((10, 2), np.int16), "s16", "stereo", 48_000)
    with pytest.raises(AudioFormatError, match="only with numpy"):
        AudioFramer().push(good, 48_000)
    assert issubclass(AudioFormatError, ValueError)


def test_zero_length_input_is_a_no_op() -> None:
    """Empty numpy arrays and empty PyAV frames return no frames and change nothing."""
    framer = AudioFramer()
    assert framer.push(np.zeros(0, np.float32), 16_000) == []
    assert framer.push(np.zeros((0, 2), np.int16), 48_000) == []
    assert framer.push(av.AudioFrame(format="s16", layout="stereo", samples=0)) == []
    assert framer.state.samples_produced == 0
    assert framer.flush() == []


def test_float_input_beyond_full_scale_is_clipped() -> None:
    """Hot float input (|x| up to 16) is accepted; output samples stay within [-1, 1]."""
    framer = AudioFramer()
    y = _concat(framer.push(_sine(200, 0.5, 16_000, amp=3.0, channels=1), 16_000))
    assert np.abs(y).max() == 1.0


def test_flush_pads_with_zeros_and_indices_continue() -> None:
    """flush() completes the last frame with zeros; later pushes keep consecutive indices."""
    framer = AudioFramer()
    out = framer.push(np.full(1_000, 0.5, np.float32), 16_000)
    assert len(out) == 1
    out += framer.flush()
    assert len(out) == 2 and framer.state.padded_samples == 280
    np.testing.assert_array_equal(out[1].samples[:360], np.full(360, 0.5, np.float32))
    np.testing.assert_array_equal(out[1].samples[360:], np.zeros(280, np.float32))
    out += framer.push(np.full(640, 0.5, np.float32), 16_000, start_s=100.0)
    out += framer.flush()
    _check_indices(out)
    assert len(out) == 3 and framer.state.samples_emitted == 3 * FRAME_SAMPLES
    assert framer.flush() == []


def test_config_rejects_inconsistent_limits() -> None:
    """A jitter tolerance above the gap-fill limit, or a negative limit, is refused."""
    with pytest.raises(ValueError, match="jitter_tolerance_s"):
        FramerConfig(max_gap_fill_s=0.001, jitter_tolerance_s=0.01)
    with pytest.raises(ValueError, match="jitter_tolerance_s"):
        FramerConfig(max_gap_fill_s=-1.0)
