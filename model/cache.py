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
    branch_room: int = 256  # longest decode branch that can be rolled back


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
        slots: torch.Tensor,
        index: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store new K/V (B, kv_heads, T, D) of ``slots`` (B,) at ``index`` (B, T)."""
        b, h, t, _ = k.shape
        si = slots.view(b, 1, 1).expand(b, h, t)
        hi = torch.arange(h, device=k.device).view(1, h, 1).expand(b, h, t)
        ti = index.view(b, 1, t).expand(b, h, t)
        self.k[layer].index_put_((si, hi, ti), k.to(self.dtype))
        self.v[layer].index_put_((si, hi, ti), v.to(self.dtype))
