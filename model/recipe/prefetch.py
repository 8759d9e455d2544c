"""Batches made ahead on a background thread while the current step trains.

A training step's batch is a pure function of the step (``train.make_batch``: the seed,
the step, the shards), and making one (reading clips, voice shift, rendering scenes,
patching) is single-threaded Python and numpy work that the step otherwise waits for.
``Prefetcher`` makes the batches of the next steps on a thread of its own, so that this
work overlaps the forward and backward pass (which release the GIL in torch's kernels).

Invariants:

- ``get(step)`` returns exactly ``make(step)``: the thread calls the same function on
  the same steps, in order, and is the only caller of ``make`` while it runs (so
  ``make`` may keep state, such as the corpus refresh every 100 steps).
- Steps are taken in order from ``start``. Asking for another step (a resumed or
  rewound run) restarts the thread at that step; nothing made for other steps is used.
- An exception in ``make`` is raised by the ``get`` of that step, in the caller.
- At most ``depth`` batches wait in memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

B = TypeVar("B")

_POLL = 0.1  # seconds between the producer's looks at the stop flag when the queue is full


class Prefetcher(Generic[B]):
    """``make(step)`` for ``start``, ``start + 1``, ... on a background thread."""

    def __init__(self, make: Callable[[int], B], start: int, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._make = make
        self._depth = depth
        self._q: queue.Queue[tuple[int, B | None, BaseException | None]]
        self._stop: threading.Event
        self._next: int
        self._thread: threading.Thread | None = None
        self._launch(start)

    def _launch(self, start: int) -> None:
        self._q = queue.Queue(self._depth)
        self._stop = threading.Event()
        self._next = start
        self._thread = threading.Thread(
            target=self._run, args=(start, self._q, self._stop), name="batch-prefetch", daemon=True
        )
        self._thread.start()

    def _run(
        self,
        step: int,
        q: queue.Queue[tuple[int, B | None, BaseException | None]],
        stop: threading.Event,
    ) -> None:
        while not stop.is_set():
            try:
                item: tuple[int, B | None, BaseException | None] = (step, self._make(step), None)
            except BaseException as e:  # handed to the consumer, who raises it
                item = (step, None, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int) -> B:
        """The batch of ``step`` (made ahead when the steps come in order)."""
        if step != self._next:
            self.close()
            self._launch(step)
        got, batch, err = self._q.get()
        assert got == step, (got, step)
        self._next = step + 1
        if err is not None:
            self.close()
            self._next = -1  # the next get restarts the thread
            raise err
        return cast(B, batch)

    def close(self) -> None:
        """Stop the thread (after the batch it is making) and drop what waits."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Prefetcher[B]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
