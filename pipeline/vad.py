"""Voice activity: Silero VAD (the ONNX file shipped in the ``silero-vad`` wheel) on onnxruntime.

``SileroModel`` holds the onnxruntime session only (weights, shared by every
stream). ``Vad`` is one stream's state: the model's recurrent state, its 64
samples of context, the samples not yet forming a 512-sample window, and the
hysteresis that turns window probabilities into speech segments:

- speech starts when a window's probability reaches ``threshold``;
- speech ends after ``min_silence_ms`` of windows below ``threshold - 0.15``;
- segments shorter than ``min_speech_ms`` when they end are reported as noise
  (``VadResult.noise``) so the caller can discard them.

``Vad.push(frame)`` takes one 640-sample frame (40 ms) and returns the state of
that frame; windows are 512 samples, so a frame's probability is that of the
last window completed within it (or the previous one).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from rawcast.pipeline.media import FRAME_SAMPLES, SAMPLE_RATE

WINDOW = 512
CONTEXT = 64


def default_model_path() -> Path:
    return Path(str(resources.files("silero_vad").joinpath("data/silero_vad.onnx")))


class SileroModel:
    """The shared onnxruntime session (stateless; every stream keeps its own state)."""

    def __init__(self, path: str | Path | None = None) -> None:
        opts = ort.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        # Creating an onnxruntime session resets the process's OpenMP thread count to 1,
        # which would silently halve torch's throughput on the engine thread: restore it.
        threads = torch.get_num_threads()
        self.session = ort.InferenceSession(
            str(path or default_model_path()), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        torch.set_num_threads(threads)
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def run(
        self, x: npt.NDArray[np.float32], state: npt.NDArray[np.float32]
    ) -> tuple[float, npt.NDArray[np.float32]]:
        """One window with its context: x (1, 576) -> speech probability, new state."""
        out, new_state = self.session.run(None, {"input": x, "state": state, "sr": self._sr})
        return float(out.reshape(-1)[0]), new_state


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5
    min_silence_ms: int = 400
    min_speech_ms: int = 160

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError("VAD threshold must be in (0, 1)")


@dataclass(frozen=True)
class VadResult:
    """The state after one frame."""

    speech: bool  # the frame is inside a speech segment
    started: bool = False  # a segment started at this frame
    ended: bool = False  # the segment ended at this frame (the frame itself is silence)
    noise: bool = False  # the ended segment was shorter than min_speech_ms
    probability: float = 0.0


class Vad:
    def __init__(self, model: SileroModel, config: VadConfig | None = None) -> None:
        self.model = model
        self.config = config or VadConfig()
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._prob = 0.0
        self.in_speech = False
        self._speech_frames = 0
        self._silent_frames = 0

    def push(self, samples: npt.NDArray[np.float32]) -> VadResult:
        if samples.shape != (FRAME_SAMPLES,):
            raise ValueError(f"VAD takes frames of {FRAME_SAMPLES} samples")
        buf = np.concatenate([self._pending, samples])
        while buf.size >= WINDOW:
            win, buf = buf[:WINDOW], buf[WINDOW:]
            x = np.concatenate([self._context, win]).reshape(1, -1).astype(np.float32)
            self._prob, self._state = self.model.run(x, self._state)
            self._context = win[-CONTEXT:]
        self._pending = buf
        return self._decide(self._prob)

    def _decide(self, prob: float) -> VadResult:
        cfg = self.config
        frame_ms = 1000 * FRAME_SAMPLES // SAMPLE_RATE
        if not self.in_speech:
            if prob >= cfg.threshold:
                self.in_speech = True
                self._speech_frames = 1
                self._silent_frames = 0
                return VadResult(speech=True, started=True, probability=prob)
            return VadResult(speech=False, probability=prob)
        self._speech_frames += 1
        if prob < cfg.threshold - 0.15:
            self._silent_frames += 1
        else:
            self._silent_frames = 0
        if self._silent_frames * frame_ms >= cfg.min_silence_ms:
            self.in_speech = False
            voiced = (self._speech_frames - self._silent_frames) * frame_ms
            return VadResult(
                speech=False, ended=True, noise=voiced < cfg.min_speech_ms, probability=prob
            )
        return VadResult(speech=True, probability=prob)
