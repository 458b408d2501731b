"""The embedded engine: any local Hugging Face causal LM, in process, with a radix prefix KV cache.

One call = one batch (split in chunks of `max_batch_size`). For each request the longest cached prefix of
its input is looked up in the radix tree and locked; the match is capped at len(input) - 1 (as SGLang
does) so at least one input token is computed and gives the logits of the first new token. The runner
gathers the cached KV once, computes only the uncached suffixes, decodes all rows together and hands
each finished row's KV (input + output) back here to be inserted into the tree, so the next segment of
the same path, and every sibling branching from it, is a cache hit. Compute runs in a worker thread and
one batch runs at a time, so the event loop (the web server) stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from treepo.service.engine.kv_pool import KVPool
from treepo.service.engine.model_runner import ModelRunner, RowInput, RowKV
from treepo.service.engine.prefix_groups import SharedPrefix, shared_prefixes
from treepo.service.engine.protocol import EngineError, EngineRequestError, GenerateOutput, GenerateRequest
from treepo.service.engine.radix_cache import RadixCache, TreeNode
from treepo.service.engine.token_sampling import SamplingBatch
from treepo.service.engine.weights import load_weights, read_state_dict

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineCounters:
    """Totals since start (for metrics and tests)."""

    num_requests: int = 0
    num_calls: int = 0
    cached_tokens: int = 0  # input tokens served from the radix cache
    prefill_tokens: int = 0  # input tokens computed
    decoded_tokens: int = 0


class EmbeddedEngine:
    """Implements the `Engine` protocol on a local Hugging Face causal LM (CPU or CUDA)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_cache_tokens: int = 65_536,
        max_batch_size: int = 64,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        """`eos_token_ids` overrides the generation config (`()`: never stop on EOS, for benchmarks)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (got {max_batch_size})")
        self.model = _load_model(model_path, device, dtype)
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.min_shared_prefix_tokens = 4  # shorter shared uncached prefixes are not worth a separate pass
        config = self.model.config.get_text_config(decoder=True)
        self.vocab_size = int(config.vocab_size)
        self._max_context = int(getattr(config, "max_position_embeddings", 0) or 1_000_000)
        self._eos = tuple(eos_token_ids) if eos_token_ids is not None else _eos_token_ids(self.model)
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        pad = pad if pad is not None else (*self._eos, 0)[0]  # any id: padded positions are masked
        self.pool = KVPool(max_cache_tokens, device=self.device)
        self.radix = RadixCache(on_evict=self.pool.free)
        self.runner = ModelRunner(self.model, self.pool, pad_token_id=pad)
        self.counters = EngineCounters()
        self._version = 0
        self._lock = asyncio.Lock()
        logger.info("embedded engine: %s on %s, eos %s", model_path, self.device, self._eos)

    # Engine protocol

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def max_context(self) -> int:
        return self._max_context

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        requests = list(requests)
        for request in requests:
            self._validate(request)
        async with self._lock:
            try:
                return await asyncio.to_thread(self.generate_sync, requests)
            except (RuntimeError, torch.OutOfMemoryError) as error:  # the model failed, not the caller
                logger.exception("embedded engine batch of %d requests failed", len(requests))
                raise EngineError(f"embedded engine failed a batch: {error}") from error

    async def update_weights(self, path: str, version: int) -> None:
        async with self._lock:
            await asyncio.to_thread(self.update_weights_sync, path, version)

    async def health(self) -> bool:
        return self.model is not None

    # Synchronous API (benchmarks, scripts)

    def generate_sync(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Blocking `generate`; chunks of `max_batch_size` run one after another."""
        outputs: list[GenerateOutput] = []
        for start in range(0, len(requests), self.max_batch_size):
            outputs.extend(self._run_chunk(list(requests[start : start + self.max_batch_size])))
        self.counters.num_calls += 1
        return outputs

    def update_weights_sync(self, path: str | Path, version: int) -> None:
        """Load safetensors weights of the same architecture, flush the prefix cache, set `policy_version`."""
        load_weights(self.model, read_state_dict(path))
        self.flush_cache()
        self._version = version
        logger.info("weights %s loaded as policy version %d", path, version)

    def flush_cache(self) -> None:
        assert self.radix.protected_size == 0, "flush while a batch holds cache nodes"
        self.radix.reset()
        self.pool.clear()

    @property
    def num_computed_tokens(self) -> int:
        """Real tokens passed through the model (uncached prefill + decode)."""
        return self.runner.num_computed_tokens

    # Internal helpers

    def _run_chunk(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        computed_for, shared_locks = self._prefill_shared_prefixes(requests)
        matches = [self.radix.match_prefix(request.input_ids) for request in requests]
        for match in matches:
            self.radix.inc_lock_ref(match.last_node)
        for node in shared_locks:
            self.radix.dec_lock_ref(node)
        try:
            rows = [
                RowInput(
                    input_ids=list(request.input_ids),
                    cached_slots=match.indices[: min(match.length, len(request.input_ids) - 1)],
                    max_new_tokens=request.max_new_tokens,
                    stop_token_ids=frozenset(self._eos) | frozenset(request.stop_token_ids),
                )
                for request, match in zip(requests, matches, strict=True)
            ]
            results = self.runner.run(rows, self._sampling(requests), lambda _, ids, kv: self._store(ids, kv))
        finally:
            for match in matches:
                self.radix.dec_lock_ref(match.last_node)
        outputs = []
        for i, (row, result) in enumerate(zip(rows, results, strict=True)):
            # tokens computed for the call's shared prefixes are accounted to one request of each group
            cached = max(0, int(row.cached_slots.numel()) - computed_for.get(i, 0))
            outputs.append(
                GenerateOutput(
                    output_ids=result.output_ids,
                    logprobs=result.logprobs,
                    finish_reason=result.finish_reason,
                    cached_tokens=cached,
                    prefill_tokens=len(row.input_ids) - cached,
                    policy_version=self._version,
                )
            )
            self._count(outputs[-1])
        return outputs

    def _prefill_shared_prefixes(
        self, requests: list[GenerateRequest]
    ) -> tuple[dict[int, int], list[TreeNode]]:
        """Compute once the uncached prefixes requests share; returns (tokens per owner, locked nodes)."""
        inputs = [list(request.input_ids) for request in requests]
        cached = [min(self.radix.match_prefix(ids).length, len(ids) - 1) for ids in inputs]
        computed: dict[int, int] = {}
        locked: list[TreeNode] = []
        try:
            for level in shared_prefixes(inputs, cached, min_tokens=self.min_shared_prefix_tokens):
                self._prefill_level(level, computed, locked)
        except BaseException:
            for node in locked:
                self.radix.dec_lock_ref(node)
            raise
        return computed, locked

    def _prefill_level(
        self, level: list[SharedPrefix], computed: dict[int, int], locked: list[TreeNode]
    ) -> None:
        """One prefill pass over shared prefixes that do not nest; their nodes stay locked (in `locked`)."""
        matches = [self.radix.match_prefix(group.token_ids) for group in level]
        rows = [
            RowInput(group.token_ids, match.indices[: len(group.token_ids) - 1], 1, frozenset())
            for group, match in zip(level, matches, strict=True)
        ]
        for match in matches:
            self.radix.inc_lock_ref(match.last_node)
        try:
            self.runner.prefill(rows, lambda _, ids, kv: self._store(ids, kv))
        finally:
            for match in matches:
                self.radix.dec_lock_ref(match.last_node)
        for group, row in zip(level, rows, strict=True):
            new_tokens = len(row.input_ids) - int(row.cached_slots.numel())
            computed[group.owner] = computed.get(group.owner, 0) + new_tokens
            node = self.radix.match_prefix(group.token_ids).last_node
            self.radix.inc_lock_ref(node)  # kept until the batch has locked its own matches
            locked.append(node)

    def _store(self, token_ids: list[int], kv: RowKV) -> None:
        """Insert a finished row's sequence into the radix tree, writing only KV the tree lacks."""
        match = self.radix.match_prefix(token_ids)
        if match.length == len(token_ids):
            return
        self.radix.inc_lock_ref(match.last_node)  # keep the matched part while evicting for the rest
        try:
            slots = self._alloc(len(token_ids) - match.length)
            if slots is None:
                return
            end = match.length + int(slots.numel())
            keys, values = kv.gather(match.length, end)
            self.pool.write(slots, keys, values)
            present = self.radix.insert(token_ids[:end], torch.cat([match.indices, slots]))
            assert present == match.length, f"{present=} {match.length=}"
        finally:
            self.radix.dec_lock_ref(match.last_node)

    def _alloc(self, wanted: int) -> torch.Tensor | None:
        """Up to `wanted` pool slots, evicting LRU nodes as needed; None when nothing can be freed."""
        if self.pool.num_free < wanted:
            self.radix.evict(wanted - self.pool.num_free)
        n = min(wanted, self.pool.num_free)
        return self.pool.alloc(n) if n else None

    def _sampling(self, requests: list[GenerateRequest]) -> SamplingBatch:
        return SamplingBatch.build(
            [r.temperature for r in requests],
            [r.top_p for r in requests],
            [r.top_k for r in requests],
            [r.seed if r.seed is not None else secrets.randbits(63) for r in requests],
            max_steps=max(r.max_new_tokens for r in requests),
            vocab_size=self.vocab_size,
            device=self.device,
        )

    def _count(self, output: GenerateOutput) -> None:
        self.counters.num_requests += 1
        self.counters.cached_tokens += output.cached_tokens
        self.counters.prefill_tokens += output.prefill_tokens
        self.counters.decoded_tokens += len(output.output_ids)

    def _validate(self, request: GenerateRequest) -> None:
        """Reject what the model cannot run, saying how to fix it."""
        bad = [t for t in request.input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineRequestError(f"input_ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        total = len(request.input_ids) + request.max_new_tokens
        if total > self._max_context:
            raise EngineRequestError(
                f"input ({len(request.input_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) = "
                f"{total} exceeds the model context of {self._max_context}; "
                "shorten the prompt or lower max_new_tokens"
            )
        if not (math.isfinite(request.temperature) and request.temperature >= 0):
            raise EngineRequestError(f"temperature must be a finite number >= 0 (got {request.temperature})")
        if not 0 < request.top_p <= 1:
            raise EngineRequestError(f"top_p must be in (0, 1] (got {request.top_p})")
        if request.top_k != -1 and request.top_k < 1:
            raise EngineRequestError(f"top_k must be -1 (off) or >= 1 (got {request.top_k})")


def _load_model(model_path: str | Path, device: str, dtype: torch.dtype | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{path} is not a Hugging Face model directory (no config.json); pass a local model path"
        )
    if dtype is None:  # float32 on CPU (bf16 matmuls are slow there); the checkpoint's own dtype on CUDA
        dtype = torch.float32 if torch.device(device).type == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def _eos_token_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """EOS ids from the generation config (falling back to the model config); at least one is required."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        raise ValueError("the model has no eos_token_id in generation_config.json or config.json; set one")
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
