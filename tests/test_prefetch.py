"""The batch prefetcher of ``rawcast train``: the same batches as made in the loop."""

from __future__ import annotations

import threading
import time

import pytest

from rawcast.model.recipe.prefetch import Prefetcher


def test_it_returns_each_steps_batch_made_ahead_on_another_thread() -> None:
    made: list[tuple[int, str]] = []
    ahead = threading.Event()

    def make(step: int) -> list[int]:
        made.append((step, threading.current_thread().name))
        if step == 7:
            ahead.set()
        return [step, step * step]

    with Prefetcher(make, start=5, depth=2) as p:
        assert p.get(5) == [5, 25]
        assert ahead.wait(5)  # step 7 is made before anyone asks for it
        assert [p.get(s) for s in (6, 7, 8)] == [[6, 36], [7, 49], [8, 64]]
    assert [s for s, _ in made][:4] == [5, 6, 7, 8]  # in order, each once
    assert len(made) == len({s for s, _ in made})
    assert {name for _, name in made} == {"batch-prefetch"}


def test_at_most_depth_batches_wait() -> None:
    made: list[int] = []

    def make(step: int) -> int:
        made.append(step)
        return step

    with Prefetcher(make, start=0, depth=2) as p:
        assert p.get(0) == 0
        time.sleep(0.5)
        # step 0 taken, 1 and 2 queued, 3 made and waiting for room: never more
        assert len(made) <= 4
        assert [p.get(s) for s in range(1, 6)] == [1, 2, 3, 4, 5]


def test_another_step_restarts_it_there() -> None:
    """A rewound or resumed loop asks for a step out of order: it gets that step's batch,
    never one made for another step."""
    with Prefetcher(lambda s: f"batch {s}", start=0, depth=3) as p:
        assert p.get(0) == "batch 0"
        assert p.get(10) == "batch 10"
        assert p.get(11) == "batch 11"
        assert p.get(3) == "batch 3"


def test_an_error_in_make_is_raised_by_the_get_of_that_step() -> None:
    def make(step: int) -> int:
        if step == 2:
            raise ValueError("shard 2 is unreadable")
        return step

    p = Prefetcher(make, start=0, depth=2)
    assert p.get(0) == 0 and p.get(1) == 1
    with pytest.raises(ValueError, match="shard 2 is unreadable"):
        p.get(2)
    assert p.get(1) == 1  # it can start again
    p.close()


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Prefetcher(lambda s: s, start=0, depth=0)
