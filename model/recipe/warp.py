"""Formant warp: another vocal tract for the same pitch and timing (``--voice-warp``).

The voice shift (``train.voice_shift``) resamples a clip, so its formants, its pitch
and its tempo all scale together: a shorter vocal tract always comes with a higher
voice, faster. Speakers are not like that. This warp moves the formants alone, as
VTLP (vocal tract length perturbation) does on filterbanks, but on the waveform, since
the model reads raw samples:

- a short-time Fourier transform (``torch.stft``: 512-sample Hann windows, hop 128:
  32 ms / 8 ms);
- each frame's log magnitude split into its envelope (the first ``LIFTER`` cepstral
  coefficients: the vocal tract) and the rest (the harmonics: the pitch);
- the envelope stretched along frequency by ``alpha`` (a peak at f moves to
  alpha * f), the harmonics left where they are, the phase kept;
- ``torch.istft`` back (weighted overlap-add), cut to the clip's length, its RMS kept.

Nothing moves in time, so the word end times of the clip stay valid.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

N_FFT = 512
HOP = 128
LIFTER = 24  # cepstral cut: 1.5 ms at 16 kHz, below the period of a 400 Hz voice
WARP = (0.85, 1.18)  # log-uniform range of alpha (VTLP's is about 0.9-1.1)


def formant_warp(audio: npt.NDArray[np.float32], alpha: float) -> npt.NDArray[np.float32]:
    """``audio`` with its spectral envelope stretched by ``alpha`` along frequency."""
    n = audio.size
    if n < N_FFT:
        return audio
    x = torch.from_numpy(audio.astype(np.float64))
    win = torch.hann_window(N_FFT, dtype=torch.float64)
    spec = torch.stft(x, N_FFT, HOP, window=win, return_complex=True)  # (bins, frames)
    cep = torch.fft.irfft(torch.log(spec.abs() + 1e-9), n=N_FFT, dim=0)
    cep[LIFTER : N_FFT - LIFTER + 1] = 0.0
    env = torch.fft.rfft(cep, dim=0).real
    src = torch.arange(env.shape[0], dtype=torch.float64) / alpha  # new bin k = old k / alpha
    lo = src.floor().long().clamp(0, env.shape[0] - 1)
    hi = (lo + 1).clamp(max=env.shape[0] - 1)
    frac = (src - lo).clamp(0.0, 1.0)[:, None]
    warped = env[lo] * (1 - frac) + env[hi] * frac
    y = torch.istft(spec * torch.exp(warped - env), N_FFT, HOP, window=win, length=n).numpy()
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
