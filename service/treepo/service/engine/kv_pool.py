"""A fixed pool of per-token KV slots shared by every cached sequence (the storage behind the radix cache).

Slot 0 is reserved and zero: it pads short rows when prefixes are gathered into a batch, so padded
positions hold finite values that the attention mask hides. The tensors are created on the first write,
when the model's KV shape is known; on CPU their pages are only committed as slots get used.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

PAD_SLOT = 0


class KVPool:
    """`capacity` token slots of keys and values for every layer, with a free list."""

    def __init__(self, capacity: int, *, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"max_cache_tokens must be >= 1 (got {capacity})")
        self.capacity = capacity
        self.device = torch.device(device)
        self.keys: torch.Tensor | None = None  # (num_layers, capacity + 1, num_kv_heads, head_dim)
        self.values: torch.Tensor | None = None
        self.clear()

    # Public API

    def clear(self) -> None:
        """Every slot free again (the caller resets the radix tree at the same time)."""
        self._free = torch.arange(1, self.capacity + 1, dtype=torch.int64)

    @property
    def num_free(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """`n` free slots, or None when fewer are free (evict first)."""
        if n > self.num_free:
            return None
        slots, self._free = self._free[:n], self._free[n:]
        return slots

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, slots.to(torch.int64).cpu()])

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store KV of `len(slots)` tokens; keys/values: (num_layers, n, num_kv_heads, head_dim)."""
        if self.keys is None:
            self._create(keys)
        assert self.keys is not None and self.values is not None
        assert keys.shape[1] == slots.numel(), f"{keys.shape=} {slots.shape=}"
        index = slots.to(self.device)
        self.keys[:, index] = keys.to(self.keys.dtype)
        self.values[:, index] = values.to(self.values.dtype)

    def gather(self, slot_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of a (batch, length) grid of slots, as (num_layers, batch, num_kv_heads, length, head_dim)."""
        assert self.keys is not None and self.values is not None, "gather from an empty pool"
        batch, length = slot_rows.shape
        index = slot_rows.reshape(-1).to(self.device)
        shape = (self.keys.shape[0], batch, length, *self.keys.shape[2:])  # (L, B, T, H, D)
        keys = self.keys[:, index].view(shape).transpose(2, 3)  # (L, B, H, T, D)
        values = self.values[:, index].view(shape).transpose(2, 3)
        return keys, values

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    # Internal helpers

    def _create(self, like: torch.Tensor) -> None:
        num_layers, _, heads, head_dim = like.shape
        shape = (num_layers, self.capacity + 1, heads, head_dim)
        self.keys = torch.empty(shape, dtype=like.dtype, device=self.device)
        self.values = torch.empty(shape, dtype=like.dtype, device=self.device)
        self.keys[:, PAD_SLOT] = 0
        self.values[:, PAD_SLOT] = 0
        logger.info("KV pool: %d slots x %s (%.1f MiB)", self.capacity, list(shape[2:]), self.nbytes / 2**20)
