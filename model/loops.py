"""A stop rule for greedy decodes that have fallen into a loop.

A small or undertrained model decoding greedily can repeat a block of tokens until
``max_new_tokens`` ("the whettttttttttttt..."): every partial and final event then
carries the loop, and the decode costs its whole token budget. ``loop_cut`` looks
at the END of the tokens generated so far: when they finish with one block of at
most ``max_period`` tokens repeated at least ``min_repeats`` times, covering at
least ``min_span`` tokens, the decode stops there and keeps the text up to and
including the block's first copy.

It only stops and cuts, never changes a token: what it keeps is a prefix of plain
greedy decoding (so the transformers parity of greedy output holds up to the cut).
Checked once per new token, it finds a loop as soon as it is long enough, which is
the earliest such a rule can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LoopRule:
    min_repeats: int = 4  # copies of the block at the end, the first included
    max_period: int = 8  # the longest block looked for, in tokens
    min_span: int = 12  # the repeated tail must cover at least this many tokens

    def __post_init__(self) -> None:
        if self.min_repeats < 2:
            raise ValueError("min_repeats must be >= 2")
        if self.max_period < 1:
            raise ValueError("max_period must be >= 1")


LOOP_RULE = LoopRule()  # the engine's default


def loop_cut(tokens: Sequence[int], rule: LoopRule = LOOP_RULE) -> int | None:
    """How many of ``tokens`` to keep if they end in a loop (the prefix before it and
    one copy of its block), else None. The shortest looping block wins, and a block of
    ``p`` tokens needs ``max(min_repeats, ceil(min_span / p))`` copies."""
    n = len(tokens)
    for p in range(1, rule.max_period + 1):
        need = max(rule.min_repeats, -(-rule.min_span // p))
        if p * need > n:
            continue
        tail = tokens[n - p :]
        copies = 1
        while copies < need and tokens[n - p * (copies + 1) : n - p * copies] == tail:
            copies += 1
        if copies < need:
            continue
        start = n - p * copies  # walk back over every earlier copy: keep the first only
        while start >= p and tokens[start - p : start] == tail:
            start -= p
        return start + p
    return None
