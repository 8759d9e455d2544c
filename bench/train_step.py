"""Training-step speed of the rawcast-tiny recipe: fp32 against bf16 autocast.

Both precisions build the same model (same seed and init) and take the same batches
(the recipe's own ``make_batch`` over the generated data); steps alternate between the
two, so a noisy machine slows both alike. Printed: median milliseconds per optimizer
step (forward, backward, AdamW) for each, the ratio, and the loss each reached after
the timed steps (the same batches, so a bf16 that learned worse would show here).

    python bench/train_step.py --data-dir data/rawcast-tiny --steps 30 --threads 1
    python bench/train_step.py --sweep-threads 1,2   # fp32 at 1 and 2 threads instead
    python bench/train_step.py --sweep-procs --steps 40   # rawcast train's --procs 2 against
                                                          # --threads 1 and --threads 2
    python bench/train_step.py --sweep-prefetch --steps 60 --threads 2  # --prefetch 2 against 0

``--sweep-procs`` runs ``rawcast train``'s own loop (``train.train``, a throwaway run
directory each) in each layout, twice in turn, and reads the time per step off the
run's log after the warmup steps: whole runs, since replicas are processes.
``--sweep-prefetch`` does the same for ``rawcast train --prefetch 2`` (batches made on a
background thread) against ``--prefetch 0`` at ``--threads``, and for ``--threads 1
--prefetch 2`` (the other core makes the batches), with the last shipped phase's flags
(mixed batches, voice shift, the alignment and count losses).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import describe

from rawcast.model.recipe import data as D
from rawcast.model.recipe import train as T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("data/rawcast-tiny"))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frontend", choices=T.FRONTENDS, default="fourier")
    ap.add_argument(
        "--sweep-threads", default=None, metavar="N,M",
        help="compare fp32 steps at these thread counts instead of the precisions "
        "(how much a second core speeds `rawcast train --threads`)",
    )  # fmt: skip
    ap.add_argument(
        "--sweep-procs", action="store_true",
        help="time rawcast train's loop with --procs 2 (1 thread each) against one process "
        "at 1 and at 2 threads",
    )  # fmt: skip
    ap.add_argument(
        "--sweep-prefetch", action="store_true",
        help="time rawcast train's loop with --prefetch 2 against --prefetch 0 (the last "
        "shipped phase's flags, --threads threads)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.sweep_procs:
        sweep_procs(args)
        return
    if args.sweep_prefetch:
        sweep_prefetch(args)
        return

    if args.sweep_threads:
        counts = [int(n) for n in args.sweep_threads.split(",")]
        variants = {f"fp32, {n} thread(s)": ("fp32", n) for n in counts}
    else:
        variants = {prec: (prec, args.threads) for prec in T.PRECISIONS}
    trainers = {
        name: T.build(
            args.data_dir,
            T.TrainConfig(threads=n, precision=prec, frontend=args.frontend),
            D.DataConfig(),
        )
        for name, (prec, n) in variants.items()
    }
    times: dict[str, list[float]] = {name: [] for name in trainers}
    last: dict[str, dict[str, float]] = {}
    lr = T.TrainConfig().lr / 4
    first = next(iter(trainers.values()))
    for step in range(args.warmup + args.steps):
        batch = first.batch(step)
        for name, tr in trainers.items():
            torch.set_num_threads(variants[name][1])
            t0 = time.perf_counter()
            last[name], _ = tr.step(batch, lr)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    threads = args.sweep_threads or str(args.threads)
    print(
        f"# bench/train_step.py on {describe()}, torch {torch.__version__}, "
        f"{threads} thread(s), batch {T.TrainConfig().batch}, "
        f"{args.steps} timed steps after {args.warmup}"
    )
    names = list(trainers)
    base = statistics.median(times[names[0]])
    print(f"| variant | ms / step (median) | speed vs {names[0]} | loss after | ce | ctc |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        lo = last[name]
        print(
            f"| {name} | {med * 1000:.0f} | {base / med:.2f}x | {lo['loss']:.3f} | "
            f"{lo['ce']:.3f} | {lo.get('ctc', float('nan')):.3f} |"
        )


def _seconds_per_step(
    args: argparse.Namespace, flags: dict[str, Any], procs: int = 1, prefetch: int = 0
) -> float:
    """One throwaway ``train.train`` run: seconds per step after the warmup steps."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = T.TrainConfig(
            steps=args.warmup + args.steps, frontend=args.frontend, export_every=10**6,
            max_minutes=10**6, **flags,
        )  # fmt: skip
        run = Path(tmp) / "run"
        T.train(args.data_dir, run, Path(tmp) / "out", cfg, D.DataConfig(),
                log=lambda _: None, procs=procs, prefetch=prefetch)  # fmt: skip
        recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        spent = recs[-1]["min"] - recs[args.warmup - 1]["min"]
        return 60 * spent / args.steps


def sweep_procs(args: argparse.Namespace) -> None:
    layouts = {  # name: (procs, threads each)
        "1 process, 1 thread": (1, 1),
        "1 process, 2 threads": (1, 2),
        "2 processes, 1 thread each": (2, 1),
    }
    per_step: dict[str, list[float]] = {name: [] for name in layouts}
    for _round in range(2):
        for name, (procs, threads) in layouts.items():
            per_step[name].append(_seconds_per_step(args, {"threads": threads}, procs=procs))
    print(
        f"# bench/train_step.py --sweep-procs on {describe()}, torch {torch.__version__}, "
        f"batch {T.TrainConfig().batch}, {args.steps} timed steps after {args.warmup}, "
        "each layout twice in turn"
    )
    _table(per_step)


def sweep_prefetch(args: argparse.Namespace) -> None:
    from rawcast.model.recipe.phases import SHIPPED

    last = SHIPPED[-1]
    flags = {k: v for k, v in last.flags.items() if k != "draw_from"}
    layouts = {  # name: (threads, prefetch)
        f"--threads {args.threads} --prefetch 0": (args.threads, 0),
        f"--threads {args.threads} --prefetch 2": (args.threads, 2),
        "--threads 1 --prefetch 2": (1, 2),
    }
    per_step: dict[str, list[float]] = {name: [] for name in layouts}
    for _round in range(2):
        for name, (threads, prefetch) in layouts.items():
            per_step[name].append(
                _seconds_per_step(args, {**flags, "threads": threads}, prefetch=prefetch)
            )
    print(
        f"# bench/train_step.py --sweep-prefetch on {describe()}, torch {torch.__version__}, "
        f"phase {last.name}'s flags, batch {T.TrainConfig().batch}, "
        f"{args.steps} timed steps after {args.warmup}, each layout twice in turn"
    )
    _table(per_step)


def _table(per_step: dict[str, list[float]]) -> None:
    names = list(per_step)
    base = statistics.median(per_step[names[0]])
    print(f"| layout | s / step (two runs) | speed vs {names[0]} |")
    print("|---|---|---|")
    for name, ts in per_step.items():
        runs = " / ".join(f"{t:.2f}" for t in ts)
        print(f"| {name} | {runs} | {base / statistics.median(ts):.2f}x |")


if __name__ == "__main__":
    main()
