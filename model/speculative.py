"""Speculative greedy decoding with the MTP drafter over rawcast's step API.

A ``Stream`` is one greedy decode in flight: a slot, or a branch buffer over a
slot, plus its newest greedy token (not yet in the cache) and the target's hidden
state that predicted it. One round for a batch of streams:

1. ``draft``: ONE batched ``Drafter.propose`` call drafts k_i tokens per stream and
   returns each stream's verify row ``[token, d1 .. dk]`` (ragged ``Append`` rows).
2. The caller runs the verify rows through ``model.step_hidden`` in the SAME forward
   as any other rows of that tick (media appends, plain decode rows).
3. ``accept``: the target's greedy token after each verify position is
   g_0 .. g_k; the drafts agreeing with them (d_i == g_{i-1}) are accepted, up to
   the first disagreement, and g_n (the correction, or a bonus token when all k
   agreed) is the next newest token. The cache keeps ``[token, d1 .. dn]``
   and rolls back the rejected rest (``KVCache.rollback`` on a slot,
   ``rollback_branch`` on a branch buffer). Emitted tokens are g_0 .. g_n, exactly
   what plain greedy decoding emits one per step; a stop token or the stream's
   budget cuts the round short at that token (the cache then holds what plain greedy
   would hold).

k adapts per stream with transformers' "heuristic" schedule: +2 after a round whose
drafts were all accepted, -1 otherwise, within [k_min, k_max]; it is also capped
by the room left (branch buffer, full-attention capacity, rollback distance) and
by the stream's budget, and 0 falls back to a plain one-token greedy row.

Engine integration (``pipeline/engine.py`` is not changed here):
- Start a stream from the row that opens a branch: run the tick with
  ``step_hidden`` instead of ``step``; the branch row's last hidden state gives
  ``Stream.hidden`` and ``model.head`` of it the first token (``Stream.start``).
- Each tick, replace the one-token decode row of a speculative branch by
  ``draft(...)``'s verify row; take ordinary rows' logits as ``head`` of their last
  hidden state, and pass the verify rows' hidden states to ``accept``, which
  returns the tokens to route to the branch (possibly several per tick).
- Use the same ``suppress`` ids as the engine's greedy, and size
  ``CacheSpec.branch_room`` for the longest decode plus k_max + 1 (the verify row's
  rejected tokens sit in the buffer until ``accept`` rolls them back). The drafter's
  sliding layers look one token further back than the target's; if a rollback has
  already reused that ring entry the drafter simply does not see it (drafts may
  differ slightly, outputs never do: the target verifies every token).
Exactness holds up to floating-point reduction order: a (k+1)-token verify row and
k+1 one-token steps compute the same logits through different kernel shapes, so a
near tie could in principle break differently.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rawcast.model.cache import KVCache
from rawcast.model.gemma4 import Append, Gemma4Unified


class Proposer(Protocol):
    """What ``draft`` needs of a drafter (``rawcast.model.drafter.Drafter``)."""

    def propose(
        self,
        target: Gemma4Unified,
        cache: KVCache,
        rows: Sequence[Append],
        hidden: torch.Tensor,
        k: int,
        suppress: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class SpecConfig:
    k: int = 4  # initial draft length
    k_min: int = 1
    k_max: int = 8

    def adapt(self, k: int, accepted: int, drafted: int) -> int:
        """transformers' heuristic schedule: grow by 2 after a clean round, else shrink by 1."""
        return min(self.k_max, k + 2) if accepted == drafted else max(self.k_min, k - 1)


@dataclass
class Stream:
    """One greedy decode: ``token`` is the newest greedy token, not yet in the cache."""

    slot: int
    branch: int | None
    token: int
    hidden: torch.Tensor  # (H,) the target's final-normed hidden state that predicted ``token``
    k: int
    budget: int | None = None  # tokens it may still emit after ``token`` (None: unbounded)
    done: bool = False
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @staticmethod
    def start(
        row: Append,
        hidden: torch.Tensor,
        token: int,
        k: int,
        budget: int | None = None,
        stop: Collection[int] = (),
    ) -> Stream:
        """A stream after ``row`` was stepped: its last hidden state predicted ``token``."""
        return Stream(row.slot, row.branch, token, hidden, k, budget, token in stop or budget == 0)

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens that the target accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def room(self, cache: KVCache) -> int:
        """The longest draft the cache can verify and roll back for this stream."""
        if self.branch is not None:
            left = cache.spec.branch_room - cache.branch_length(self.branch) - 1
        else:
            left = cache.spec.branch_room  # rollback distance
            if cache.cfg.full_layers:
                left = min(left, cache.full_capacity - cache.length(self.slot) - 1)
        if self.budget is not None:
            left = min(left, self.budget - 1)
        return max(0, left)


def greedy_tokens(logits: torch.Tensor, suppress: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax over the vocabulary with ``suppress`` ids excluded (as the engine does)."""
    if suppress is not None:
        logits = logits.index_fill(-1, suppress, float("-inf"))
    return logits.argmax(-1)


@torch.inference_mode()
def begin(
    model: Gemma4Unified,
    cache: KVCache,
    rows: Sequence[Append],
    config: SpecConfig = SpecConfig(),
    budget: int | None = None,
    stop: Collection[int] = (),
    suppress: torch.Tensor | None = None,
) -> list[Stream]:
    """Append prompt rows in ONE step and start one stream per row."""
    hidden = model.step_hidden(rows, cache)
    last = torch.tensor([len(torch.as_tensor(r.tokens).reshape(-1)) - 1 for r in rows])
    h = hidden[torch.arange(len(rows)), last.to(hidden.device)]
    tokens = greedy_tokens(model.head(h), suppress).tolist()
    return [Stream.start(r, h[i], tokens[i], config.k, budget, stop) for i, r in enumerate(rows)]


def draft(
    drafter: Proposer | None,
    model: Gemma4Unified,
    cache: KVCache,
    streams: Sequence[Stream],
    suppress: torch.Tensor | None = None,
) -> list[Append]:
    """Each stream's verify row ``[token, drafts...]``, drafted in ONE batched call."""
    ks = [0 if drafter is None else min(s.k, s.room(cache)) for s in streams]
    drafts: list[list[int]] = [[] for _ in streams]
    if drafter is not None and max(ks, default=0) > 0:
        rows = [Append(s.slot, [s.token], branch=s.branch) for s in streams]
        hidden = torch.stack([s.hidden for s in streams])
        drafts = drafter.propose(model, cache, rows, hidden, max(ks), suppress).tolist()
        if suppress is not None:  # never accepted, and a media id would need media: cut there
            banned = set(suppress.tolist())
            ks = [
                next((j for j, t in enumerate(d[:k]) if t in banned), k)
                for d, k in zip(drafts, ks, strict=True)
            ]
    return [
        Append(s.slot, [s.token, *d[:k]], branch=s.branch)
        for s, d, k in zip(streams, drafts, ks, strict=True)
    ]


@torch.inference_mode()
def accept(
    model: Gemma4Unified,
    cache: KVCache,
    streams: Sequence[Stream],
    rows: Sequence[Append],
    hidden: torch.Tensor,
    config: SpecConfig = SpecConfig(),
    stop: Collection[int] = (),
    suppress: torch.Tensor | None = None,
) -> list[list[int]]:
    """Verify stepped rows (``hidden``: their ``step_hidden`` output), commit, roll back.

    Returns the tokens each stream emits this round (at least one).
    """
    lengths = [len(r.tokens) for r in rows]
    width = max(lengths)
    g = greedy_tokens(model.head(hidden[:, :width]), suppress).tolist()
    out: list[list[int]] = []
    for i, (s, r, n_row) in enumerate(zip(streams, rows, lengths, strict=True)):
        drafts = list(r.tokens)[1:]
        k = n_row - 1
        n = 0
        while n < k and int(drafts[n]) == g[i][n]:
            n += 1
        s.drafted += k
        s.accepted += n
        s.rounds += 1
        if k:
            s.k = config.adapt(s.k, n, k)
        emitted = g[i][: n + 1]
        for j, tok in enumerate(emitted):
            if tok in stop or (s.budget is not None and j + 1 >= s.budget):
                emitted = emitted[: j + 1]
                s.done = True
                break
        n = len(emitted) - 1  # keep [token, d1 .. dn]: the tokens before the last emitted one
        if s.branch is None:
            cache.rollback(s.slot, cache.length(s.slot) - k + n)
        else:
            cache.rollback_branch(s.branch, cache.branch_length(s.branch) - k + n)
        s.token = emitted[-1]
        s.hidden = hidden[i, n]
        if s.budget is not None:
            s.budget -= len(emitted)
        out.append(emitted)
    return out


@dataclass(frozen=True)
class Result:
    tokens: list[list[int]]  # per prompt row: the first greedy token and everything after
    forwards: int  # target forwards after the prompt step
    drafted: int
    accepted: int

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def generate(
    model: Gemma4Unified,
    drafter: Proposer | None,
    cache: KVCache,
    rows: Sequence[Append],
    max_new_tokens: int,
    config: SpecConfig = SpecConfig(),
    stop: Collection[int] = (),
    suppress: torch.Tensor | None = None,
) -> Result:
    """Append ``rows`` (prompts) and decode up to ``max_new_tokens`` greedy tokens per row.

    All streams verify together, one target forward per round; without a drafter every
    round is a plain one-token greedy step. The last emitted token is not appended
    (as in plain greedy decoding).
    """
    streams = begin(model, cache, rows, config, max_new_tokens - 1, stop, suppress)
    out = [[s.token] for s in streams]
    forwards = 0
    while live := [i for i, s in enumerate(streams) if not s.done]:
        batch = [streams[i] for i in live]
        verify = draft(drafter, model, cache, batch, suppress)
        hidden = model.step_hidden(verify, cache)
        forwards += 1
        new = accept(model, cache, batch, verify, hidden, config, stop, suppress)
        for i, toks in zip(live, new, strict=True):
            out[i].extend(toks)
    return Result(
        tokens=out,
        forwards=forwards,
        drafted=sum(s.drafted for s in streams),
        accepted=sum(s.accepted for s in streams),
    )


@torch.inference_mode()
def greedy(
    model: Gemma4Unified,
    cache: KVCache,
    rows: Sequence[Append],
    max_new_tokens: int,
    stop: Collection[int] = (),
    suppress: torch.Tensor | None = None,
) -> list[list[int]]:
    """Plain greedy decoding, one token per row per ``model.step``: the reference."""
    tokens = greedy_tokens(model.step(rows, cache), suppress).tolist()
    out = [[t] for t in tokens]
    live = [i for i, t in enumerate(tokens) if t not in stop and max_new_tokens > 1]
    while live:
        step = [Append(rows[i].slot, [out[i][-1]], branch=rows[i].branch) for i in live]
        new = greedy_tokens(model.step(step, cache), suppress).tolist()
        for i, t in zip(live, new, strict=True):
            out[i].append(t)
        live = [i for i in live if out[i][-1] not in stop and len(out[i]) < max_new_tokens]
    return out
