"""Training-step speed of the rawcast-tiny recipe: fp32 against bf16 autocast.

Both precisions build the same model (same seed and init) and take the same batches
(the recipe's own ``make_batch`` over the generated data); steps alternate between the
two, so a noisy machine slows both alike. Printed: median milliseconds per optimizer
step (forward, backward, AdamW) for each, the ratio, and the loss each reached after
the timed steps (the same batches, so a bf16 that learned worse would show here).

    python bench/train_step.py --data-dir data/rawcast-tiny --steps 30 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from machine import describe

from rawcast.model.recipe import data as D
from rawcast.model.recipe import train as T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("data/rawcast-tiny"))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per precision")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frontend", choices=T.FRONTENDS, default="fourier")
    args = ap.parse_args()

    trainers = {
        prec: T.build(
            args.data_dir,
            T.TrainConfig(threads=args.threads, precision=prec, frontend=args.frontend),
            D.DataConfig(),
        )
        for prec in T.PRECISIONS
    }
    times: dict[str, list[float]] = {p: [] for p in trainers}
    last: dict[str, dict[str, float]] = {}
    lr = T.TrainConfig().lr / 4
    for step in range(args.warmup + args.steps):
        batch = trainers["fp32"].batch(step)
        for prec, tr in trainers.items():
            t0 = time.perf_counter()
            last[prec], _ = tr.step(batch, lr)
            if step >= args.warmup:
                times[prec].append(time.perf_counter() - t0)

    print(
        f"# bench/train_step.py on {describe()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), batch {T.TrainConfig().batch}, "
        f"{args.steps} timed steps after {args.warmup}"
    )
    base = statistics.median(times["fp32"])
    print("| precision | ms / step (median) | speed vs fp32 | loss after | ce | ctc |")
    print("|---|---|---|---|---|---|")
    for prec, ts in times.items():
        med = statistics.median(ts)
        lo = last[prec]
        print(
            f"| {prec} | {med * 1000:.0f} | {base / med:.2f}x | {lo['loss']:.3f} | "
            f"{lo['ce']:.3f} | {lo.get('ctc', float('nan')):.3f} |"
        )


if __name__ == "__main__":
    main()
