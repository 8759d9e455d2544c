"""Formant warp: another vocal tract for the same pitch and timing (``--voice-warp``).

The voice shift (``train.voice_shift``) resamples a clip, so its formants, its pitch
and its tempo all scale together: a shorter vocal tract always comes with a higher
voice, faster. Speakers are not like that. This warp moves the formants alone, as
VTLP (vocal tract length perturbation) does on filterbanks, but on the waveform, since
the model reads raw samples:

- a short-time Fourier transform (512-sample Hann windows, hop 128: 32 ms / 8 ms);
- each frame's log magnitude split into its envelope (the first ``LIFTER`` cepstral
  coefficients: the vocal tract) and the rest (the harmonics: the pitch);
- the envelope stretched along frequency by ``alpha`` (a peak at f moves to
  alpha * f), the harmonics left where they are, the phase kept;
- weighted overlap-add back, cut to the clip's length, its RMS kept.

Nothing moves in time, so the word end times of the clip stay valid.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

N_FFT = 512
HOP = 128
LIFTER = 24  # cepstral cut: 1.5 ms at 16 kHz, below the period of a 400 Hz voice
WARP = (0.85, 1.18)  # log-uniform range of alpha (VTLP's is about 0.9-1.1)


def formant_warp(audio: npt.NDArray[np.float32], alpha: float) -> npt.NDArray[np.float32]:
    """``audio`` with its spectral envelope stretched by ``alpha`` along frequency."""
    n = audio.size
    if n < N_FFT:
        return audio
    x = np.pad(audio.astype(np.float64), (N_FFT, N_FFT + (-n) % HOP))
    win = np.hanning(N_FFT + 1)[:-1]  # periodic Hann: overlap-adds flat at hop N_FFT / 4
    frames = sliding_window_view(x, N_FFT)[::HOP] * win
    spec = np.fft.rfft(frames, axis=1)
    logmag = np.log(np.abs(spec) + 1e-9)
    cep = np.fft.irfft(logmag, n=N_FFT, axis=1)
    cep[:, LIFTER : N_FFT - LIFTER + 1] = 0.0
    env = np.fft.rfft(cep, axis=1).real
    bins = np.arange(env.shape[1], dtype=np.float64)
    src = bins / alpha  # the new envelope at bin k is the old one at k / alpha
    lo = np.clip(np.floor(src).astype(np.int64), 0, bins.size - 1)
    hi = np.minimum(lo + 1, bins.size - 1)
    frac = np.clip(src - lo, 0.0, 1.0)
    warped = env[:, lo] * (1 - frac) + env[:, hi] * frac
    out_spec = spec * np.exp(warped - env)
    out_frames = np.fft.irfft(out_spec, n=N_FFT, axis=1) * win
    y = np.zeros_like(x)
    norm = np.zeros_like(x)
    for j in range(N_FFT // HOP):  # frames j, j + 4, ... tile the signal without overlap
        at, seg = j * HOP, out_frames[j :: N_FFT // HOP].reshape(-1)
        y[at : at + seg.size] += seg
        norm[at : at + seg.size] += np.tile(win**2, seg.size // N_FFT)
    y = (y / np.maximum(norm, 1e-8))[N_FFT : N_FFT + n]
    rms_in = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))
    rms_out = float(np.sqrt(np.mean(y**2)))
    if rms_out > 0:
        y *= rms_in / rms_out
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def voice_warp(
    audio: npt.NDArray[np.float32], rng: np.random.Generator, share: float
) -> npt.NDArray[np.float32]:
    """With probability ``share``, ``formant_warp`` by a log-uniform alpha in ``WARP``."""
    if rng.random() >= share:
        return audio
    return formant_warp(audio, float(np.exp(rng.uniform(*np.log(WARP)))))
