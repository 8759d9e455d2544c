"""``rawcast train --voice-warp``: the formants move, the pitch and the timing stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from test_recipe import SMALL, _training_slice, needs_espeak

from rawcast.model.recipe import train as T
from rawcast.model.recipe.warp import formant_warp, voice_warp

RATE = 16_000
F0 = 120.0


def _vowel(formant: float, seconds: float = 1.5) -> npt.NDArray[np.float32]:
    """Harmonics of F0 under one Gaussian formant: a sustained synthetic vowel."""
    t = np.arange(int(RATE * seconds)) / RATE
    x = sum(
        np.exp(-0.5 * ((k * F0 - formant) / 150) ** 2) * np.cos(2 * np.pi * k * F0 * t)
        for k in range(1, 60)
    )
    return (0.1 * x).astype(np.float32)


def _harmonics(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64], float]:
    """Amplitude at each harmonic of F0, and the share of the energy at them."""
    mid = x[2000:-2000].astype(np.float64)
    mag = np.abs(np.fft.rfft(mid * np.hanning(mid.size)))
    freqs = np.fft.rfftfreq(mid.size, 1 / RATE)
    near = np.zeros(mag.size, dtype=bool)
    amps = []
    for k in range(1, 60):
        band = np.abs(freqs - k * F0) < 15
        near |= band
        amps.append(mag[band].max())
    return np.array(amps), float((mag[near] ** 2).sum() / (mag**2).sum())


@pytest.mark.parametrize("alpha", [0.85, 1.0, 1.2])
def test_the_formant_moves_by_alpha_and_the_pitch_stays(alpha: float) -> None:
    x = _vowel(1000.0)
    y = formant_warp(x, alpha)
    amps, at_harmonics = _harmonics(y)
    peak = (int(np.argmax(amps)) + 1) * F0
    assert abs(peak - 1000.0 * alpha) <= F0 / 2  # the nearest harmonic to the new formant
    assert at_harmonics > 0.95  # still the harmonics of 120 Hz: the pitch did not move
    assert y.shape == x.shape and y.dtype == np.float32
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert float(np.sqrt(np.mean(y.astype(np.float64) ** 2))) == pytest.approx(rms, rel=1e-3)
    if alpha == 1.0:
        np.testing.assert_allclose(y, x, atol=1e-5)


def test_nothing_moves_in_time() -> None:
    """A vowel between silences comes out between the same silences: word end times stay."""
    x = np.concatenate([np.zeros(8000), _vowel(700.0, 0.5), np.zeros(8000)]).astype(np.float32)
    y = formant_warp(x, 1.15)
    env = np.abs(y)
    assert env[:7500].max() < 0.01 * env.max() and env[16500:].max() < 0.01 * env.max()
    assert np.abs(y[8500:15500]).mean() > 0.5 * np.abs(x[8500:15500]).mean()


def test_voice_warp_is_seeded_and_takes_its_share() -> None:
    x = _vowel(1000.0, 0.5)
    a = voice_warp(x, np.random.default_rng(3), 1.0)
    b = voice_warp(x, np.random.default_rng(3), 1.0)
    assert np.array_equal(a, b) and not np.array_equal(a, x)
    assert voice_warp(x, np.random.default_rng(3), 0.0) is x
    short = x[:100]
    assert voice_warp(short, np.random.default_rng(3), 1.0) is short  # below one window


@needs_espeak
def test_warped_batches_differ_in_their_speech_only(tmp_path: Path) -> None:
    """With ``voice_warp`` a step's batch has the same tasks, targets, alignment windows
    and frame counts (nothing moved in time); only the speech samples differ."""
    dcfg = _training_slice(tmp_path)
    tr = T.build(tmp_path, T.TrainConfig(**SMALL), dcfg)
    plain = T.TrainConfig(**{**SMALL, "batch": 8}, align_weight=0.5)
    warped = T.TrainConfig(**{**SMALL, "batch": 8}, align_weight=0.5, voice_warp=1.0)
    changed = 0
    for step in range(3):
        a = T.make_batch(tr.fmt, tr.corpus, plain, step, tr.lex)
        b = T.make_batch(tr.fmt, tr.corpus, warped, step, tr.lex)
        for x, y in zip(a, b, strict=True):
            assert (x.task, x.tokens, x.ctc, x.align) == (y.task, y.tokens, y.ctc, y.align)
            if x.task != "caption":
                assert x.audio is not None and y.audio is not None
                assert x.audio.shape == y.audio.shape
                changed += int(not np.array_equal(x.audio, y.audio))
    assert changed > 0
