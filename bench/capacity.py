"""Capacity: how many real-time streams (audio + transcription, translation, captions)
this machine sustains while end-of-utterance -> final text stays under 1 s at p95.

Each stream loops a spoken clip (1 s silence, speech, 1 s silence) and a camera
frame at 1 fps, paced in real time through the asyncio engine. Latency is the wall
time from pushing the last voiced sample of an utterance to receiving its final
transcript (so it includes the VAD's end-of-speech hangover).

    python bench/capacity.py                      # random tiny model
    python bench/capacity.py --model rawcast-tiny --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rawcast.model.gemma4 import Gemma4Unified
from rawcast.pipeline.engine import Engine, EngineConfig
from rawcast.pipeline.media import TextEvent
from rawcast.pipeline.session import SessionConfig, Tasks
from rawcast.pipeline.vad import SileroModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_model import fixture_pcm, tiny_model  # test helpers live in tests/

CHUNK = 1600  # 100 ms pushes


def clip() -> tuple[np.ndarray, int]:
    pcm = fixture_pcm()
    voiced = np.nonzero(np.abs(pcm) > 0.02)[0]
    sil = np.zeros(16000, np.float32)
    return np.concatenate([sil, pcm, sil]), 16000 + int(voiced[-1]) + 1


async def stream(engine: Engine, seconds: float, lat: list[float]) -> None:
    audio, speech_end = clip()
    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    cfg = SessionConfig(
        tasks=Tasks(transcribe=True, translate="Spanish", caption=True),
        max_new_tokens=16, max_soft_tokens=70,
    )  # fmt: skip
    h = await engine.open_session(cfg)
    pushed: dict[int, float] = {}

    async def reader() -> None:
        async for ev in h.events():
            if isinstance(ev, TextEvent) and ev.final and ev.task == "transcribe":
                loop_i = ev.start_sample // audio.size
                t_end = pushed.get(loop_i)
                if t_end is not None:
                    lat.append(time.perf_counter() - t_end)

    task = asyncio.create_task(reader())
    t0 = time.perf_counter()
    n = int(seconds * 16000) // CHUNK
    for i in range(n):
        at = t0 + i * CHUNK / 16000
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        pos = i * CHUNK
        a = pos % audio.size
        h.push_audio(
            np.resize(audio[a:], CHUNK) if a + CHUNK > audio.size else audio[a : a + CHUNK], 16000
        )
        now = time.perf_counter()
        for k in range(pos // audio.size, (pos + CHUNK) // audio.size + 1):
            end = k * audio.size + speech_end
            if pos <= end < pos + CHUNK:
                pushed[k] = now
        if i % 10 == 0:
            h.push_image(image, pos / 16000)
    h.close()
    await task


async def trial(model: Gemma4Unified, vad: SileroModel, n: int, seconds: float) -> list[float]:
    engine = Engine(model, EngineConfig(max_sessions=n, max_image_tokens=70), vad_model=vad)
    await engine.start()
    lat: list[float] = []
    try:
        await asyncio.gather(*(stream(engine, seconds, lat) for _ in range(n)))
    finally:
        await engine.stop()
    return lat


def p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95)) if xs else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default="", help="checkpoint dir or bundled name (default: random tiny)"
    )
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seconds", type=float, default=16.0)
    ap.add_argument("--max-streams", type=int, default=64)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.model:
        import rawcast.model as rm

        model = rm.load(args.model, dtype=dtype)
    else:
        model = tiny_model().to(dtype)
    vad = SileroModel()
    print(
        f"# bench/capacity.py on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"model {args.model or 'random tiny'} {args.dtype}, {args.seconds:.0f} s per trial"
    )
    best, n = 0, 1
    while n <= args.max_streams:
        lat = asyncio.run(trial(model, vad, n, args.seconds))
        ok = p95(lat) < 1.0 and len(lat) >= n
        p50 = statistics.median(lat) if lat else float("nan")
        verdict = "ok" if ok else "over"
        print(
            f"streams {n:3d}: finals {len(lat):3d}, p50 {p50:.3f} s, p95 {p95(lat):.3f} s"
            f" -> {verdict}",
            flush=True,
        )
        if not ok:
            break
        best, n = n, n * 2
    lo, hi = best, min(n, args.max_streams + 1)
    while hi - lo > 1 and best:
        mid = (lo + hi) // 2
        lat = asyncio.run(trial(model, vad, mid, args.seconds))
        ok = p95(lat) < 1.0 and len(lat) >= mid
        print(f"streams {mid:3d}: p95 {p95(lat):.3f} s -> {'ok' if ok else 'over'}", flush=True)
        lo, hi = (mid, hi) if ok else (lo, mid)
    best = lo
    print(f"\nmax real-time streams with p95 < 1 s: {best}")
    if best >= 2:
        half = best // 2
        lat = asyncio.run(trial(model, vad, half, args.seconds))
        q = np.percentile(lat, [50, 90, 95, 99])
        print(
            f"at half load ({half} streams): p50 {q[0]:.3f} s, p90 {q[1]:.3f} s, "
            f"p95 {q[2]:.3f} s, p99 {q[3]:.3f} s over {len(lat)} utterances"
        )


if __name__ == "__main__":
    main()
