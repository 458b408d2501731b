"""A transformers cache whose layers write into preallocated buffers instead of growing by `torch.cat`.

`DynamicCache` concatenates every new token onto the whole cache, copying all KV once per step per
layer. Here each layer owns a (B, H, capacity, D) buffer sized for the call (cached prefix + suffix +
max new tokens); a step writes one column in place and the model sees a view of the filled part.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
    """A `DynamicLayer` backed by a buffer of `capacity` positions (grown by doubling if ever exceeded)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._keys: torch.Tensor | None = None  # (B, H, capacity, D)
        self._values: torch.Tensor | None = None
        self._length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, length, head_dim = key_states.shape
        shape = (batch, heads, max(self.capacity, length), head_dim)
        self._keys = key_states.new_empty(shape)
        self._values = value_states.new_empty((*shape[:3], value_states.shape[-1]))
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        if end > self._keys.shape[2]:
            self._grow(end)
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._length = end
        self._refresh()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._refresh()

    def _grow(self, needed: int) -> None:
        size = max(needed, 2 * self._keys.shape[2])
        pad = size - self._keys.shape[2]
        self._keys = torch.nn.functional.pad(self._keys, (0, 0, 0, pad))
        self._values = torch.nn.functional.pad(self._values, (0, 0, 0, pad))

    def _refresh(self) -> None:
        self.keys = self._keys[:, :, : self._length]  # (B, H, T, D) view
        self.values = self._values[:, :, : self._length]


def batch_cache(
    num_layers: int, capacity: int, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
):
    """A `DynamicCache` of `BufferedLayer`s, optionally holding `prefix` KV per layer, (B, H, P, D) each."""
    layers = [BufferedLayer(capacity) for _ in range(num_layers)]
    for layer, (keys, values) in zip(layers, prefix or [], strict=False):
        layer.update(keys, values)
    cache = DynamicCache()
    cache.layers = layers
    return cache
