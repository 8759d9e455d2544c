"""Speech for the recipe: Debian's TTS engines, and augmentation that matches real use.

Design decisions:

- Engines are command-line programs (espeak-ng, flite, festival's text2wave); each
  voice is a frozen ``Voice`` whose ``synth`` returns 16 kHz mono float32. Whole
  families are held out for evaluation: the festival engine (every voice), flite's
  ``awb`` voice and espeak-ng's Caribbean accent (``en-029``) never appear in training.
- Resampling and the Opus round trip go through PyAV (libswresample, libopus), the
  same libraries the serving path uses, so training audio has WebRTC's artefacts.
- Augmentation is a pure function of the clip and a seeded ``numpy`` generator:
  speed perturbation, silence padding, gain, noise (white/pink/brown) at an SNR,
  telephone band-limiting, Opus at a low bitrate. Same seed, same bytes.
- Word end times are estimated from the clean clip: the voiced span (energy above
  -40 dB of the peak) is shared among words by character count. They are used to
  train on truncated audio (the transcript of what was fully spoken so far).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt

RATE = 16_000
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Voice:
    engine: str  # espeak-ng | flite | festival
    name: str  # espeak-ng: language+variant; flite: voice; festival: voice function suffix

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.name}"


ESPEAK_TRAIN_LANGS = (
    "en-us",
    "en",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
)
ESPEAK_VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "klatt",
    "klatt3",
)
FLITE_TRAIN = ("kal", "kal16", "rms", "slt")

HELDOUT_VOICES = (
    Voice("festival", "kal_diphone"),
    Voice("festival", "ked_diphone"),
    Voice("festival", "cmu_us_slt_arctic_hts"),
    Voice("flite", "awb"),
    Voice("espeak-ng", "en-029"),
    Voice("espeak-ng", "en-029+f2"),
)


def engine_available(engine: str) -> bool:
    exe = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "text2wave"}[engine]
    return shutil.which(exe) is not None


def train_voices() -> list[Voice]:
    """Every training voice whose engine is installed (espeak-ng accents x variants, flite)."""
    out: list[Voice] = []
    if engine_available("espeak-ng"):
        for lang in ESPEAK_TRAIN_LANGS:
            for var in ESPEAK_VARIANTS:
                out.append(Voice("espeak-ng", f"{lang}+{var}" if var else lang))
    if engine_available("flite"):
        out.extend(Voice("flite", v) for v in FLITE_TRAIN)
    return out


def heldout_voices() -> list[Voice]:
    return [v for v in HELDOUT_VOICES if engine_available(v.engine)]


def read_wav(path: Path) -> tuple[F32, int]:
    with wave.open(str(path), "rb") as w:
        rate = w.getframerate()
        ch = w.getnchannels()
        width = w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"{path}: expected 16-bit PCM, got {8 * width}-bit")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return x.astype(np.float32), rate


def resample(x: F32, rate_in: int, rate_out: int = RATE) -> F32:
    """Mono float32 resampling through libswresample (exact output length)."""
    if rate_in == rate_out or x.size == 0:
        return x.astype(np.float32)
    res = av.AudioResampler(format="flt", layout="mono", rate=rate_out)
    frame = av.AudioFrame.from_ndarray(
        x.reshape(1, -1).astype(np.float32), format="flt", layout="mono"
    )
    frame.sample_rate = rate_in
    parts = [f.to_ndarray().reshape(-1) for f in res.resample(frame)]
    parts += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    y = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    n = round(x.size * rate_out / rate_in)
    if y.size < n:
        y = np.pad(y, (0, n - y.size))
    return y[:n].astype(np.float32)


def synth(voice: Voice, text: str, speed: float = 1.0, pitch: int = 50) -> F32:
    """Speak ``text`` with ``voice``: 16 kHz mono float32. ``speed`` 1.0 = engine default."""
    with tempfile.TemporaryDirectory(prefix="rawcast-tts-") as tmp:
        out = Path(tmp) / "out.wav"
        if voice.engine == "espeak-ng":
            cmd = [
                "espeak-ng",
                "-v",
                voice.name,
                "-s",
                str(round(165 * speed)),
                "-p",
                str(pitch),
                "-w",
                str(out),
                text,
            ]
            subprocess.run(cmd, check=True, capture_output=True)
        elif voice.engine == "flite":
            stretch = f"{1.0 / speed:.3f}"
            f0 = (
                str(round(100 + (pitch - 50) * 1.2))
                if voice.name not in ("slt",)
                else str(round(170 + (pitch - 50) * 1.5))
            )
            cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={stretch}"]
            cmd += ["--setf", f"int_f0_target_mean={f0}", "-t", text, "-o", str(out)]
            subprocess.run(cmd, check=True, capture_output=True)
        elif voice.engine == "festival":
            scheme = f"(voice_{voice.name}) (Parameter.set 'Duration_Stretch {1.0 / speed:.3f})"
            cmd = ["text2wave", "-eval", scheme, "-o", str(out)]
            subprocess.run(cmd, input=text, check=True, capture_output=True, text=True)
        else:
            raise ValueError(f"unknown engine {voice.engine!r}")
        x, rate = read_wav(out)
    return resample(x, rate, RATE)


def voiced_span(x: F32, rate: int = RATE) -> tuple[int, int]:
    """(start, end) samples of the part above -40 dB of the loudest 10 ms block."""
    hop = rate // 100
    n = x.size // hop
    if n == 0:
        return 0, x.size
    e = (x[: n * hop].reshape(n, hop) ** 2).mean(axis=1)
    on = np.nonzero(e > e.max() * 1e-4)[0]
    if on.size == 0:
        return 0, x.size
    return int(on[0] * hop), int(min(x.size, (on[-1] + 1) * hop))


def word_ends(x: F32, text: str) -> list[int]:
    """Estimated end sample of each word: the voiced span shared by character count."""
    words = text.split()
    start, end = voiced_span(x)
    weights = np.array([len(w) + 1 for w in words], dtype=np.float64)
    cum = np.cumsum(weights) / weights.sum()
    return [int(start + c * (end - start)) for c in cum]


# --- augmentation ---------------------------------------------------------------------------


def _noise(rng: np.random.Generator, n: int, kind: str) -> F32:
    white = rng.standard_normal(n).astype(np.float32)
    if kind == "white" or n < 4:
        return white
    spec = np.fft.rfft(white)
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    spec = spec / (np.sqrt(f) if kind == "pink" else f)
    y = np.fft.irfft(spec, n).astype(np.float32)
    return y / (np.sqrt((y**2).mean()) + 1e-9)


def band_limit(x: F32, low: float = 300.0, high: float = 3400.0, rate: int = RATE) -> F32:
    """Telephone band: zero the spectrum outside [low, high] Hz."""
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(x.size, 1.0 / rate)
    spec[(freqs < low) | (freqs > high)] = 0
    return np.fft.irfft(spec, x.size).astype(np.float32)


def opus_round_trip(x: F32, bitrate: int = 24_000, rate: int = RATE) -> F32:
    """Encode to Opus at 48 kHz (what WebRTC sends) and decode back to 16 kHz."""
    hi = resample(x, rate, 48_000)
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate = 48_000
    enc.layout = "mono"
    enc.format = av.AudioFormat("s16")
    enc.bit_rate = bitrate
    enc.open()
    dec = av.CodecContext.create("libopus", "r")
    dec.sample_rate = 48_000
    dec.layout = "mono"
    pcm = (np.clip(hi, -1, 1) * 32767).astype(np.int16)
    size = 960
    pcm = np.pad(pcm, (0, (-pcm.size) % size))
    out: list[npt.NDArray[np.float32]] = []

    def drain(packets: list[av.Packet]) -> None:
        for pkt in packets:
            for fr in dec.decode(pkt):
                arr = fr.to_ndarray().reshape(-1)
                if arr.dtype == np.int16:
                    out.append(arr.astype(np.float32) / 32768.0)
                else:
                    out.append(arr.astype(np.float32))

    for i in range(0, pcm.size, size):
        fr = av.AudioFrame.from_ndarray(
            pcm[i : i + size].reshape(1, -1), format="s16", layout="mono"
        )
        fr.sample_rate = 48_000
        fr.pts = i
        drain(enc.encode(fr))
    drain(enc.encode(None))
    y = np.concatenate(out) if out else np.zeros(0, np.float32)
    skip = 312  # libopus' encoder delay at 48 kHz (pre-skip), removed to keep alignment
    y = y[skip : skip + hi.size]
    if y.size < hi.size:
        y = np.pad(y, (0, hi.size - y.size))
    return resample(y, 48_000, rate)


@dataclass(frozen=True)
class Augmented:
    audio: F32
    word_ends: list[int]
    desc: str


def augment(x: F32, ends: list[int], rng: np.random.Generator, strength: float = 1.0) -> Augmented:
    """Speed, padding, gain, noise, band-limit and Opus, each with its own probability."""
    desc = []
    ends_f = np.asarray(ends, dtype=np.float64)
    if rng.random() < 0.5 * strength:
        factor = float(rng.uniform(0.88, 1.12))
        x = resample(x, round(RATE * factor), RATE)
        ends_f = ends_f / factor
        desc.append(f"speed{factor:.2f}")
    lead = int(rng.uniform(0.05, 0.5) * RATE)
    tail = int(rng.uniform(0.05, 0.3) * RATE)
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(tail, np.float32)])
    ends_f = ends_f + lead
    peak = float(np.abs(x).max()) + 1e-9
    x = x / peak * float(10 ** (rng.uniform(-20, -1) / 20))
    if rng.random() < 0.7 * strength:
        kind = str(rng.choice(["white", "pink", "brown"]))
        snr = float(rng.choice([5.0, 10.0, 15.0, 20.0, 30.0]))
        lo, hi = voiced_span(x)
        p_sig = float((x[lo:hi] ** 2).mean()) + 1e-12
        noise = _noise(rng, x.size, kind)
        x = x + noise * np.float32(np.sqrt(p_sig / 10 ** (snr / 10)))
        desc.append(f"{kind}{snr:.0f}dB")
    if rng.random() < 0.2 * strength:
        x = band_limit(x)
        desc.append("phone")
    if rng.random() < 0.35 * strength:
        rate = int(rng.choice([12_000, 16_000, 24_000, 32_000]))
        x = opus_round_trip(x, rate)
        desc.append(f"opus{rate // 1000}k")
    x = np.clip(x, -1.0, 1.0).astype(np.float32)
    return Augmented(x, [int(e) for e in ends_f], "+".join(desc) or "clean")
