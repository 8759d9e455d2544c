"""Data-parallel training on one machine's CPU cores: ``rawcast train --procs N``.

Design decisions:

- N processes (one ``torch.distributed`` gloo group over a rendezvous file, so nothing
  but this machine is reached), each with the whole model and ``--threads`` threads.
  Every step each takes its share of the same global batch a single process would
  take (``make_batch(..., part=(rank, N))``), so the batches of a run do not depend on
  how many processes train it.
- The gradients are averaged in ONE flat all-reduce per step (and a parameter no
  rank has a gradient for keeps none, as in a single process), then every rank clips
  and steps alike: the replicas stay equal without ever sending weights.
- Rank 0 alone logs, saves and exports; it also owns the clock, so the learning rate
  and the stop on the time budget are broadcast from it. ``in_sync`` checks at every
  save that the replicas still hold the same weights.
- Measured on the 2-core VM (``bench/train_step.py --sweep-procs``), two 1-thread
  processes ran at 1.52x one, below ``--threads 2``'s 1.61x, so the recipe uses threads
  there; processes (``--threads`` each) are for machines with more cores, where they
  were not measured.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class Replicas:
    """This process's place in the group and the collective operations a step needs."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def average_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Every parameter's gradient becomes the mean over the replicas (a missing one
        counts as zero); one that no replica has stays None."""
        flat = [
            p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params
        ]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
        buf = torch.cat([*flat, has.to(flat[0].device)])
        dist.all_reduce(buf)
        grads, has = buf[: -len(params)] / self.world, buf[-len(params) :]
        at = 0
        for p, seen in zip(params, has.tolist(), strict=True):
            n = p.numel()
            p.grad = grads[at : at + n].view_as(p).clone() if seen > 0 else None
            at += n

    def mean_values(self, vals: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
        """The mean of each logged value over the replicas that computed it (a loss on
        captions exists only where a share held a caption)."""
        extra = sorted(set(vals) - set(keys))
        if extra:
            raise ValueError(f"values outside the shared list: {extra}")
        t = torch.zeros(2 * len(keys), dtype=torch.float64)
        for i, k in enumerate(keys):
            if k in vals:
                t[i], t[len(keys) + i] = vals[k], 1.0
        dist.all_reduce(t)
        return {k: float(t[i] / t[len(keys) + i]) for i, k in enumerate(keys) if t[len(keys) + i]}

    def leaders(self, *values: float) -> list[float]:
        """Rank 0's values, on every rank (the learning rate, whether to go on)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, src=0)
        return [float(v) for v in t]

    def in_sync(self, module_params: Sequence[torch.Tensor]) -> bool:
        """Whether every replica holds the same weights (a checksum of each tensor,
        gathered and compared)."""
        mine = torch.stack([p.detach().double().sum() for p in module_params]).cpu()
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return all(torch.equal(every[0], other) for other in every[1:])


RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)  # the longest a rank waits for another


def _join(rank: int, world: int, tmp: str) -> Replicas:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world, timeout=RENDEZVOUS_TIMEOUT)  # fmt: skip
    return Replicas(rank, world)


def _entry(rank: int, world: int, tmp: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """A spawned replica (rank >= 1): its error is kept for the parent to raise (written
    before the group closes, which is what tells rank 0 something went wrong)."""
    rep = _join(rank, world, tmp)
    try:
        fn(rep, *args)
    except BaseException as e:
        with contextlib.suppress(Exception):
            (Path(tmp) / f"error-{rank}.pickle").write_bytes(pickle.dumps(e))
        raise
    finally:
        dist.destroy_process_group()


def launch(
    procs: int, fn: Callable[..., Any], *args: Any, leader: dict[str, Any] | None = None
) -> None:
    """Run ``fn(replicas, *args)`` as rank 0 in this process, with the keyword
    arguments ``leader`` too (a log callback, say: it stays here, unpickled), and as
    ranks 1.. in ``procs - 1`` spawned processes (picklable ``fn`` and ``args``), and
    wait for all. Whichever rank failed first, its error is raised here as it was (a
    ``RunError`` stays one); the others stop."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="rawcast-replicas-") as tmp:
        others = [
            ctx.Process(target=_entry, args=(rank, procs, tmp, fn, args), daemon=True)
            for rank in range(1, procs)
        ]
        for p in others:
            p.start()
        try:
            rep = _join(0, procs, tmp)
            try:
                fn(rep, *args, **(leader or {}))
            finally:
                dist.destroy_process_group()
        except BaseException as e:
            failed_at = time.time_ns()
            for p in others:
                p.join(timeout=5)
            errors = sorted(Path(tmp).glob("error-*.pickle"), key=lambda f: f.stat().st_mtime_ns)
            # a lost peer is what another rank's error looks like from here
            if errors and (
                isinstance(e, dist.DistError) or errors[0].stat().st_mtime_ns < failed_at
            ):
                raise pickle.loads(errors[0].read_bytes()) from e
            raise
        finally:
            for p in others:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
        bad = [p.exitcode for p in others if p.exitcode]
        if bad:
            raise RuntimeError(f"a training process exited with status {bad[0]}")
