"""A fixed pool of per-token KV slots: the only KV storage of the embedded engine.

Attention reads keys and values straight from these slots (by a per-row slot table) and each new
token's KV is written into its slot in place, so rows sharing a cached prefix read the same memory.
A slot holds a token's key and value side by side, (2, num_kv_heads, head_dim) per layer, so one
`index_select` per layer reads both (measured 2x faster than two advanced-indexing gathers on CPU).
Slot 0 is reserved and zero: it pads slot tables of shorter rows (the attention mask hides it).
On CPU the pages of `torch.empty` are only committed as slots get written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

PAD_SLOT = 0


@dataclass(slots=True, frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Keys + values of one token over all layers."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


class KVPool:
    """`capacity` token slots of keys and values for every layer, with a free list."""

    def __init__(self, capacity: int, shape: KVShape, *, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"max_kv_tokens must be >= 1 (got {capacity})")
        self.capacity = capacity
        self.shape = shape
        self.device = torch.device(device)
        size = (shape.num_layers, capacity + 1, 2, shape.num_kv_heads, shape.head_dim)  # (L, S, 2, Hkv, D)
        self.kv = torch.empty(size, dtype=shape.dtype, device=self.device)
        self.kv[:, PAD_SLOT] = 0
        self.clear()
        logger.info(
            "KV pool: %d slots, %.1f MiB reserved", capacity, capacity * shape.bytes_per_token / 2**20
        )

    # Public API

    def clear(self) -> None:
        """Every slot free again (the caller resets the radix tree at the same time)."""
        self._free = list(range(self.capacity, 0, -1))  # a stack of slot numbers (plain ints: see alloc)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def alloc(self, n: int) -> list[int] | None:
        """`n` free slots, or None when fewer are free (evict first). Plain ints: slots are allocated and
        freed per request, where a tensor op would cost a GIL hand-over (see block_manager)."""
        if n > len(self._free):
            return None
        slots = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return slots

    def free(self, slots: Iterable[int]) -> None:
        self._free.extend(slots)

    def write(self, layer: int, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store one layer's KV of every token of a step at once; kv: (n, 2, num_kv_heads, head_dim)."""
        self.kv[layer].index_copy_(0, slots, kv if kv.dtype == self.kv.dtype else kv.to(self.kv.dtype))

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """One layer's KV at `slots` (any shape, int64 or int32): (*slots.shape, 2, num_kv_heads, head_dim)."""
        flat = self.kv[layer].index_select(0, slots.reshape(-1))  # (n, 2, Hkv, D)
        return flat.view(*slots.shape, *flat.shape[1:])
