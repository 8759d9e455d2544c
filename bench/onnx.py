"""Step throughput on onnxruntime (CPU) versus torch (CPU), same model, same run.

Both backends run the engine's step through the same host code (packing, masks,
KVCache) on identical caches; only the tensor work differs (``rawcast.model.onnx_step``).
Reports tokens/s for decode at batch 1 and 8 (one token per row over a prefilled
cache) and for an audio append of 12 frames (480 ms) at batch 1 and 8, as the median
of ``--reps`` steps, with the onnxruntime/torch ratio. Absolute figures depend on the
machine (printed in the header); compare the ratios.

    python bench/onnx.py                     # rawcast-tiny, batch 1 and 8
    python bench/onnx.py --threads 1 --reps 30
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from rawcast.model import Append, CacheSpec, KVCache
from rawcast.model.loader import load
from rawcast.model.onnx_step import OnnxStep, ensure_exported

PREFIX = 200  # tokens already cached in each slot
FRAMES = 12


def timeit(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fresh_cache(model: Any, batch: int) -> KVCache:
    spec = CacheSpec(slots=batch, full_capacity=PREFIX + 4096, branch_room=16, branches=1)
    cache = KVCache(model.cfg.text, spec, device=model.device, dtype=model.dtype)
    text = [t for t in range(30, 230)]
    model.step([Append(s, text[:PREFIX]) for s in range(batch)], cache)
    return cache


def bench(model: Any, runner: Any, batch: int, reps: int) -> dict[str, float]:
    cache = fresh_cache(model, batch)
    marks = [cache.mark(s) for s in range(batch)]
    tk = model.cfg.tokens
    g = torch.Generator().manual_seed(0)
    audio = [torch.randn(FRAMES, 640, generator=g) * 0.1 for _ in range(batch)]

    def decode() -> None:
        runner.step([Append(s, [42]) for s in range(batch)], cache)
        for s in range(batch):
            cache.rollback(s, marks[s])

    def append() -> None:
        runner.step([Append(s, [tk.audio] * FRAMES, audio=audio[s]) for s in range(batch)], cache)
        for s in range(batch):
            cache.rollback(s, marks[s])

    return {
        "decode": batch / timeit(decode, reps),
        "append": batch * FRAMES / timeit(append, reps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="rawcast-tiny")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="threads for both (0: default)")
    ap.add_argument("--onnx-dir", default=None, help="exported graph (default: user cache)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load(args.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        graph = ensure_exported(model, args.onnx_dir or tmp)
        ort_step = OnnxStep(model, graph, threads=args.threads or None)
        import onnxruntime

        print(
            f"# bench/onnx.py on {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"onnxruntime {onnxruntime.__version__} ({ort_step.providers[0]}), {args.model} fp32"
        )
        print("| work | batch | torch tok/s | onnxruntime tok/s | ort / torch |")
        print("|---|---|---|---|---|")
        for b in args.batches:
            t = bench(model, model, b, args.reps)
            o = bench(model, ort_step, b, args.reps)
            for work, label in (
                ("decode", "decode 1 token/row"),
                ("append", f"{FRAMES} audio frames/row"),
            ):
                print(
                    f"| {label} | {b} | {t[work]:.0f} | {o[work]:.0f} | {o[work] / t[work]:.2f}x |"
                )


if __name__ == "__main__":
    main()
