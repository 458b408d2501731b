"""Runs one batch through a Hugging Face causal LM: gather cached prefixes, prefill suffixes, decode together.

Layout of row i in the batch KV cache (P = longest cached prefix, U = longest uncached suffix):

    [pad * (P - c_i) | cached prefix c_i | pad * (U - u_i) | suffix u_i | decoded tokens ...]

The cached prefix KV is gathered from the pool once per call (one index per layer for the whole batch);
padding is hidden by the 2D attention mask and every real token gets its true position id, so each row
computes exactly what it would alone. Rows leave the batch as soon as they stop: their KV is handed to
`on_finish` (to go into the radix cache) and the batch cache shrinks to the rows still decoding.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache

from treepo.service.engine.batch_cache import batch_cache
from treepo.service.engine.kv_pool import PAD_SLOT, KVPool
from treepo.service.engine.token_sampling import SamplingBatch, sample_next

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RowInput:
    input_ids: list[int]
    cached_slots: torch.Tensor  # (c,) KV slots of input_ids[:c], c < len(input_ids)
    max_new_tokens: int
    stop_token_ids: frozenset[int]

    def __post_init__(self) -> None:
        assert self.cached_slots.numel() < len(self.input_ids), f"{self.cached_slots.numel()=}"


@dataclass(slots=True)
class RowResult:
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] = "length"


@dataclass(slots=True)
class RowKV:
    """The KV of one finished row, read lazily from the batch cache (only the part the caller wants)."""

    cache: DynamicCache
    row: int
    columns: torch.Tensor  # (n,) cache columns of the row's real tokens, in order

    def gather(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """KV of tokens [start, end) as (num_layers, n, num_kv_heads, head_dim)."""
        cols = self.columns[start:end]
        keys = torch.stack([layer.keys[self.row, :, cols] for layer in self.cache.layers])  # (L, H, n, D)
        values = torch.stack([layer.values[self.row, :, cols] for layer in self.cache.layers])
        return keys.transpose(1, 2), values.transpose(1, 2)


FinishCallback = Callable[[int, list[int], RowKV], None]
"""(row index in the call, token ids whose KV is in RowKV, RowKV) -> None."""


@dataclass(slots=True)
class _Batch:
    """The rows still decoding and their shared state."""

    rows: list[int]  # row index in the call, per batch position
    cache: DynamicCache
    mask: torch.Tensor  # (B, T) bool: real tokens in the cache (+ the current input)
    positions: torch.Tensor  # (B,) position id of the next input token
    sampling: SamplingBatch

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.int64, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        self.sampling = self.sampling.select(index.cpu())


class ModelRunner:
    """Prefill + batched decode of one call on a loaded model; counts the real tokens it computes."""

    def __init__(self, model: torch.nn.Module, pool: KVPool, *, pad_token_id: int) -> None:
        self.model = model
        self.pool = pool
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.num_layers = int(model.config.get_text_config(decoder=True).num_hidden_layers)
        self.num_computed_tokens = 0  # real (non-pad) tokens passed through the model, prefill + decode

    # Public API

    @torch.inference_mode()
    def run(
        self, rows: list[RowInput], sampling: SamplingBatch, on_finish: FinishCallback
    ) -> list[RowResult]:
        """Decode every row to a stop token or its max_new_tokens; KV of each row goes to `on_finish`."""
        results = [RowResult() for _ in rows]
        cache, mask, logits = self._prefill(rows, max(row.max_new_tokens for row in rows))
        positions = torch.tensor([len(row.input_ids) for row in rows], dtype=torch.int64, device=self.device)
        batch = _Batch(list(range(len(rows))), cache, mask, positions, sampling)
        while True:
            tokens, logprobs = sample_next(logits, batch.sampling)
            keep = self._record(rows, batch, results, tokens.tolist(), logprobs.tolist(), on_finish)
            if not keep:
                return results
            if len(keep) < len(batch.rows):
                batch.select(keep)
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
            logits = self._decode_step(batch, tokens)

    @torch.inference_mode()
    def prefill(self, rows: list[RowInput], on_finish: FinishCallback) -> None:
        """Compute the KV of every row's whole input (no decoding) and hand it to `on_finish`."""
        cache, mask, _ = self._prefill(rows, 0)
        for i, row in enumerate(rows):
            on_finish(i, row.input_ids, RowKV(cache, i, mask[i].nonzero().squeeze(1)))

    # Internal helpers

    def _prefill(
        self, rows: list[RowInput], max_new_tokens: int
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Gather cached prefixes, run the suffixes; returns (cache, mask (B, T), last logits (B, V))."""
        cached = [int(row.cached_slots.numel()) for row in rows]
        suffixes = [row.input_ids[c:] for row, c in zip(rows, cached, strict=True)]
        batch_size, prefix_len, suffix_len = len(rows), max(cached), max(len(s) for s in suffixes)
        input_ids = torch.full((batch_size, suffix_len), self.pad_token_id, dtype=torch.int64)
        position_ids = torch.zeros((batch_size, suffix_len), dtype=torch.int64)
        mask = torch.zeros((batch_size, prefix_len + suffix_len), dtype=torch.bool)
        slot_grid = torch.full((batch_size, prefix_len), PAD_SLOT, dtype=torch.int64)
        for i, (row, c, suffix) in enumerate(zip(rows, cached, suffixes, strict=True)):
            u = len(suffix)
            input_ids[i, suffix_len - u :] = torch.tensor(suffix)
            position_ids[i, suffix_len - u :] = torch.arange(c, c + u)
            mask[i, prefix_len - c : prefix_len] = True
            mask[i, prefix_len + suffix_len - u :] = True
            slot_grid[i, prefix_len - c :] = row.cached_slots
        capacity = prefix_len + suffix_len + max_new_tokens
        cache = batch_cache(self.num_layers, capacity, self._gather(slot_grid) if prefix_len else None)
        mask = mask.to(self.device)
        logits = self._forward(input_ids, mask, position_ids, cache, logits_to_keep=1)
        self.num_computed_tokens += sum(len(s) for s in suffixes)
        return cache, mask, logits

    def _gather(self, slot_grid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        keys, values = self.pool.gather(slot_grid)  # (L, B, H, P, D) each
        return list(zip(keys.unbind(0), values.unbind(0), strict=True))

    def _decode_step(self, batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((len(batch.rows), 1), dtype=torch.bool, device=self.device)
        batch.mask = torch.cat([batch.mask, ones], dim=1)  # (B, T + 1)
        logits = self._forward(tokens[:, None], batch.mask, batch.positions[:, None], batch.cache)
        batch.positions += 1
        self.num_computed_tokens += len(batch.rows)
        return logits

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits of the last input column, (B, V)."""
        kwargs = {self._cache_kwarg: cache}
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask,
            position_ids=position_ids.to(self.device),
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -1]

    def _record(
        self,
        rows: list[RowInput],
        batch: _Batch,
        results: list[RowResult],
        tokens: list[int],
        logprobs: list[float],
        on_finish: FinishCallback,
    ) -> list[int]:
        """Append this step's token to each row; finished rows go to `on_finish`; returns positions kept."""
        keep = []
        for position, (row_id, token, logprob) in enumerate(zip(batch.rows, tokens, logprobs, strict=True)):
            result, row = results[row_id], rows[row_id]
            result.output_ids.append(token)
            result.logprobs.append(logprob)
            if token in row.stop_token_ids:
                result.finish_reason = "stop"
            elif len(result.output_ids) < row.max_new_tokens:
                keep.append(position)
                continue
            sequence = row.input_ids + result.output_ids[:-1]  # the last token was sampled, never fed
            columns = batch.mask[position].nonzero().squeeze(1)
            assert columns.numel() == len(sequence), f"{columns.numel()=} {len(sequence)=}"
            on_finish(row_id, sequence, RowKV(batch.cache, position, columns))
        return keep
