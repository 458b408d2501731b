"""A fixed pool of per-token KV slots: the only KV storage of the embedded engine.

Attention reads keys and values straight from these slots (by a per-row slot table) and each new
token's KV is written into its slot in place, so rows sharing a cached prefix read the same memory.
Slot 0 is reserved and zero: it pads slot tables of shorter rows (the attention mask hides it).
On CPU the pages of `torch.empty` are only committed as slots get written.
"""

from __future__ import annotations

import logging
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
        size = (shape.num_layers, capacity + 1, shape.num_kv_heads, shape.head_dim)  # (L, S, H, D)
        self.keys = torch.empty(size, dtype=shape.dtype, device=self.device)
        self.values = torch.empty(size, dtype=shape.dtype, device=self.device)
        self.keys[:, PAD_SLOT] = 0
        self.values[:, PAD_SLOT] = 0
        self.clear()
        logger.info(
            "KV pool: %d slots, %.1f MiB reserved", capacity, capacity * shape.bytes_per_token / 2**20
        )

    # Public API

    def clear(self) -> None:
        """Every slot free again (the caller resets the radix tree at the same time)."""
        self._free = torch.arange(1, self.capacity + 1, dtype=torch.int64)

    @property
    def num_free(self) -> int:
        return int(self._free.numel())

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        """`n` free slots (int64, CPU), or None when fewer are free (evict first)."""
        if n > self.num_free:
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, slots.to(torch.int64).cpu()])

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store one layer's KV of every token of a step at once; keys/values: (n, num_kv_heads, head_dim)."""
        self.keys[layer, slots] = keys.to(self.keys.dtype)
        self.values[layer, slots] = values.to(self.values.dtype)
