"""A preallocated, fixed-capacity KV cache with one slot per stream.

Layout: every layer has K and V buffers of shape (slots, kv_heads, capacity + 1,
head_dim), allocated once. Sliding layers use a ring (token at absolute position
p lives at index p % capacity) of capacity ``window + branch_room``; full layers
use a linear buffer (index p) bounded by ``full_capacity``. The extra last column
is a trash row that padded or never-needed tokens are written to, so writes
keep a static shape.

Each kind of layer keeps one position table ``pos`` (slots, capacity + 1): the
absolute position held at each index, or -1 when empty. Attention masks are
computed from it, so rolling back is just invalidating positions >= the mark:

- ``mark(slot)`` returns the slot's current length;
- ``rollback(slot, mark)`` forgets every token appended after it. Sliding-layer
  entries that a branch overwrote in the ring are older than ``mark - window``
  and therefore never needed again, provided the branch is at most
  ``branch_room`` tokens long (checked).

Lengths live on the host (plain ints) so the hot path never syncs with the
device. Slots are reset and reused without reallocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rawcast.model.config import TextConfig


class CacheFullError(RuntimeError):
    """A slot's full-attention context is out of room: compact or reset it."""


@dataclass(frozen=True)
class CacheSpec:
    slots: int
    full_capacity: int  # tokens of bounded context for full-attention layers
    branch_room: int = 256  # longest decode branch (rolled back, or in a branch buffer)
    branches: int = 0  # branch buffers: decode continuations that share a slot's prefix


def slot_bytes(cfg: TextConfig, spec: CacheSpec, dtype: torch.dtype) -> int:
    """Bytes of K and V that one slot holds (without allocating anything)."""
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for layer in range(cfg.num_hidden_layers):
        cap = (
            (cfg.sliding_window + spec.branch_room) if cfg.is_sliding(layer) else spec.full_capacity
        )
        total += 2 * cfg.layer_kv_heads(layer) * (cap + 1) * cfg.layer_head_dim(layer) * item
    return total


class KVCache:
    def __init__(
        self,
        cfg: TextConfig,
        spec: CacheSpec,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg = cfg
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.window = cfg.sliding_window
        self.sliding_capacity = cfg.sliding_window + spec.branch_room
        self.full_capacity = spec.full_capacity
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in range(cfg.num_hidden_layers):
            cap = self.capacity(layer)
            shape = (spec.slots, cfg.layer_kv_heads(layer), cap + 1, cfg.layer_head_dim(layer))
            self.k.append(torch.zeros(shape, device=self.device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=self.device, dtype=dtype))
        self.pos_sliding = torch.full(
            (spec.slots, self.sliding_capacity + 1), -1, dtype=torch.long, device=self.device
        )
        self.pos_full = torch.full(
            (spec.slots, self.full_capacity + 1), -1, dtype=torch.long, device=self.device
        )
        # Branch buffers: (branches + 1) rows of branch_room + 1 entries for every layer;
        # the last row is a permanently empty stand-in for rows that are not branches.
        self.kb: list[torch.Tensor] = []
        self.vb: list[torch.Tensor] = []
        for layer in range(cfg.num_hidden_layers):
            shape = (
                spec.branches + 1,
                cfg.layer_kv_heads(layer),
                spec.branch_room + 1,
                cfg.layer_head_dim(layer),
            )
            self.kb.append(torch.zeros(shape, device=self.device, dtype=dtype))
            self.vb.append(torch.zeros(shape, device=self.device, dtype=dtype))
        self.pos_branch = torch.full(
            (spec.branches + 1, spec.branch_room + 1), -1, dtype=torch.long, device=self.device
        )
        self.branch_lengths = [0] * spec.branches
        self.lengths = [0] * spec.slots
        # Position of the oldest token that a rollback may still return to, per slot.
        self._rollback_floor = [0] * spec.slots

    def capacity(self, layer: int) -> int:
        return self.sliding_capacity if self.cfg.is_sliding(layer) else self.full_capacity

    def pos_table(self, layer: int) -> torch.Tensor:
        return self.pos_sliding if self.cfg.is_sliding(layer) else self.pos_full

    def nbytes_per_slot(self) -> int:
        return slot_bytes(self.cfg, self.spec, self.dtype)

    # --- slot bookkeeping (host side) -------------------------------------------------

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def reset(self, slot: int) -> None:
        self.pos_sliding[slot].fill_(-1)
        self.pos_full[slot].fill_(-1)
        self.lengths[slot] = 0
        self._rollback_floor[slot] = 0

    def reset_branch(self, branch: int) -> None:
        """Empty a branch buffer (its tokens are forgotten; the slot's prefix is untouched)."""
        self.pos_branch[branch].fill_(-1)
        self.branch_lengths[branch] = 0

    def branch_length(self, branch: int) -> int:
        return self.branch_lengths[branch]

    def rollback_branch(self, branch: int, length: int) -> None:
        """Keep a branch's first ``length`` tokens and forget the rest (rejected drafts)."""
        n = self.branch_lengths[branch]
        if not 0 <= length <= n:
            raise ValueError(f"branch rollback to {length} outside [0, {n}] for branch {branch}")
        if length < n:
            self.pos_branch[branch, length:].fill_(-1)  # a branch token's index is its offset
            self.branch_lengths[branch] = length

    def check_branch_room(self, branch: int, n: int) -> None:
        if self.branch_lengths[branch] + n > self.spec.branch_room:
            raise CacheFullError(
                f"branch {branch}: {self.branch_lengths[branch]} + {n} tokens exceed "
                f"branch_room {self.spec.branch_room}"
            )

    def mark(self, slot: int) -> int:
        return self.lengths[slot]

    def rollback(self, slot: int, mark: int) -> None:
        length = self.lengths[slot]
        if not 0 <= mark <= length:
            raise ValueError(f"rollback mark {mark} outside [0, {length}] for slot {slot}")
        if length - mark > self.spec.branch_room:
            raise ValueError(
                f"branch of {length - mark} tokens exceeds branch_room {self.spec.branch_room}"
            )
        if mark == length:
            return
        for pos in (self.pos_sliding[slot], self.pos_full[slot]):
            pos.masked_fill_(pos >= mark, -1)
        self.lengths[slot] = mark

    def check_room(self, slot: int, n: int) -> None:
        if self.lengths[slot] + n > self.full_capacity and self.cfg.full_layers:
            raise CacheFullError(
                f"slot {slot}: {self.lengths[slot]} + {n} tokens exceed the full-attention "
                f"capacity {self.full_capacity}; compact or reset the slot"
            )

    def advance(self, slot: int, n: int) -> None:
        self.lengths[slot] += n

    # --- device side ------------------------------------------------------------------

    def write_index(self, layer: int, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Buffer index for each new token; ``keep`` false sends it to the trash row."""
        cap = self.capacity(layer)
        idx = positions % cap if self.cfg.is_sliding(layer) else positions.clamp(max=cap)
        return torch.where(keep, idx, torch.full_like(idx, cap))

    def write(
        self,
        layer: int,
        rows: torch.Tensor,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        branch: bool = False,
    ) -> None:
        """Store new K/V (B, kv_heads, T, D) of slot/branch ``rows`` (B,) at ``index`` (B, T)."""
        b, h, t, _ = k.shape
        si = rows.view(b, 1, 1).expand(b, h, t)
        hi = torch.arange(h, device=k.device).view(1, h, 1).expand(b, h, t)
        ti = index.view(b, 1, t).expand(b, h, t)
        kbuf, vbuf = (self.kb[layer], self.vb[layer]) if branch else (self.k[layer], self.v[layer])
        kbuf.index_put_((si, hi, ti), k.to(self.dtype))
        vbuf.index_put_((si, hi, ti), v.to(self.dtype))
