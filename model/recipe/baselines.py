"""Offline ASR baselines on rawcast-tiny's held-out clips, scored like ``rawcast eval``.

- pocketsphinx: its US English acoustic model, dictionary and language model ship
  inside the PyPI wheel (``pip install pocketsphinx``), so it runs offline.
- Whisper tiny (faster-whisper): needs weights from a model hub, which this project
  cannot reach; it is reported as unavailable unless ``RAWCAST_WHISPER_DIR`` names a
  local CTranslate2 copy of ``whisper-tiny``.

Same clips, references and WER as ``evaluate.evaluate`` (jiwer, lowercased,
punctuation stripped), per held-out voice and overall.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rawcast.model.recipe.evaluate import heldout_clips, wer

Transcriber = Callable[[npt.NDArray[np.float32]], str]


def pocketsphinx() -> Transcriber:
    from pocketsphinx import Decoder  # type: ignore[import-untyped,import-not-found,unused-ignore]

    dec = Decoder(samprate=16000, loglevel="FATAL")

    def run(audio: npt.NDArray[np.float32]) -> str:
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        dec.start_utt()
        dec.process_raw(pcm, full_utt=True)
        dec.end_utt()
        hyp = dec.hyp()
        return hyp.hypstr if hyp is not None else ""

    return run


def whisper_tiny() -> Transcriber | None:
    """faster-whisper on a local copy of whisper-tiny, or None when there is none."""
    where = os.environ.get("RAWCAST_WHISPER_DIR")
    if not where or not Path(where).is_dir():
        return None
    from faster_whisper import WhisperModel  # type: ignore[import-not-found,unused-ignore]

    model = WhisperModel(where, device="cpu", compute_type="int8")

    def run(audio: npt.NDArray[np.float32]) -> str:
        segments, _ = model.transcribe(audio, language="en", beam_size=1)
        return " ".join(s.text.strip() for s in segments)

    return run


def score(transcribe: Transcriber, data_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """WER of ``transcribe`` on the held-out eval shards (first ``limit`` clips)."""
    refs: dict[str, list[str]] = defaultdict(list)
    hyps: dict[str, list[str]] = defaultdict(list)
    n, t0 = 0, time.perf_counter()
    for meta, audio, _ in heldout_clips(data_dir, limit):
        refs[meta["voice"]].append(meta["text"])
        hyps[meta["voice"]].append(transcribe(audio))
        n += 1
    all_refs = [r for v in refs for r in refs[v]]
    all_hyps = [h for v in refs for h in hyps[v]]
    return {
        "clips": n,
        "wer": wer(all_refs, all_hyps) if n else float("nan"),
        "wer_by_voice": {v: round(wer(refs[v], hyps[v]), 4) for v in sorted(refs)},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def pocketsphinx_available() -> bool:
    return importlib.util.find_spec("pocketsphinx") is not None


def score_all(data_dir: Path, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """``score`` of each baseline, or ``{"unavailable": what to do}`` for a missing one."""
    out: dict[str, dict[str, Any]] = {}
    ps = pocketsphinx() if pocketsphinx_available() else None
    wt = whisper_tiny()
    for name, run, missing in (
        ("pocketsphinx", ps, "pip install pocketsphinx"),
        ("whisper-tiny", wt, "set RAWCAST_WHISPER_DIR"),
    ):
        out[name] = score(run, data_dir, limit) if run is not None else {"unavailable": missing}
    return out
