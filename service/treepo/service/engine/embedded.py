"""The embedded engine: any local Llama-style Hugging Face causal LM, in process, continuously batched.

`generate` takes one request and returns when that request's row stops. A worker thread runs a
persistent decode loop (so the event loop, i.e. the web server, stays responsive): at every step
boundary it takes new requests and aborts, asks the `Scheduler` which rows run (running rows decode,
new ones prefill their uncached suffix in the same forward), lets the `BlockManager` give every fed
token a KV-pool slot, runs the `ModelRunner` and samples. A finished row leaves at once and its
caller's future resolves immediately. Prefix KV is read straight from the radix cache's pool slots.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import math
import secrets
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from treepo.service.engine.block_manager import BlockManager
from treepo.service.engine.forward_batch import build_batch
from treepo.service.engine.host_tensors import int64_tensor
from treepo.service.engine.model_runner import ModelRunner, kv_shape
from treepo.service.engine.protocol import EngineError, EngineRequestError, GenerateOutput, GenerateRequest
from treepo.service.engine.scheduler import Scheduler, SchedulerConfig
from treepo.service.engine.sequence import Sequence as Row
from treepo.service.engine.token_sampling import SamplingBatch, as_int64, sample_next
from treepo.service.engine.weights import load_weights, read_state_dict

logger = logging.getLogger(__name__)

# The worker thread and the event loop (the sampler, the web server) share the GIL. The worker gives it up
# in every torch kernel and must get it back after each one: with Python's default 5 ms hand-over it waits
# behind the loop's Python between kernels. 0.5 ms measured 8% (sequential) to 17% (a 16x4 tree) faster.
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass(slots=True)
class EngineCounters:
    """Totals since start (for metrics, benchmarks and tests)."""

    num_requests: int = 0
    cached_tokens: int = 0  # input tokens served from the radix cache
    prefill_tokens: int = 0  # input tokens computed
    decoded_tokens: int = 0


class EmbeddedEngine:
    """Implements the `Engine` protocol on a local Hugging Face causal LM (CPU or CUDA)."""

    supports_segment_seeds = True  # a request may decode several segments, one seed each

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_kv_tokens: int = 65_536,
        max_running_rows: int = 256,
        max_step_tokens: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        """`eos_token_ids` overrides the generation config (`()`: never stop on EOS, for benchmarks);
        `max_step_tokens` (tokens fed per forward) defaults to max(2048, max_running_rows)."""
        step_tokens = max_step_tokens or max(2048, max_running_rows)
        config = SchedulerConfig(max_running_rows=max_running_rows, max_step_tokens=step_tokens)
        self.model = _load_model(model_path, device, dtype)
        self.device = torch.device(device)
        text_config = self.model.config.get_text_config(decoder=True)
        self.vocab_size = int(text_config.vocab_size)
        self._max_context = int(getattr(text_config, "max_position_embeddings", 0) or 1_000_000)
        self._eos = tuple(eos_token_ids) if eos_token_ids is not None else _eos_token_ids(self.model)
        self._eos_set = frozenset(self._eos)
        model_dtype = next(self.model.parameters()).dtype
        self.blocks = BlockManager(
            max_kv_tokens,
            kv_shape(self.model, model_dtype),
            max_rows=max_running_rows,
            max_row_tokens=self._max_context,
            device=self.device,
        )
        self.runner = ModelRunner(self.model, self.blocks.pool)
        self.scheduler = Scheduler(self.blocks, config)
        self.counters = EngineCounters()
        self._dtype = model_dtype
        self._sampling_key: tuple[int, ...] = ()
        self._sampling_params: SamplingBatch | None = None
        self._version = 0
        self._inbox: deque[tuple[str, Any]] = deque()  # commands to the worker, appended from any thread
        self._wake = threading.Event()
        self._wake_due: set[asyncio.AbstractEventLoop] = set()  # loops with a wake-up scheduled
        self._update: tuple[str, int, Callable[[Any], None]] | None = None  # waits for running rows to end
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))  # process-wide
        # Full garbage collections scan every live object, and the model, torch and transformers are ~380k
        # of them; a tree run allocates enough (requests, futures, radix nodes) for a few a second, each
        # stopping both threads. Frozen, the objects alive now are not rescanned (process-wide): GC time of
        # a 16x4 tree run measured 0.9 s -> 0.3 s of ~5.5 s.
        gc.freeze()
        self._worker = threading.Thread(target=self._loop, name="embedded-engine", daemon=True)
        self._worker.start()
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

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        """Decode one request; cancelling the awaiting task aborts it at the next step boundary."""
        self._validate(request)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        row = self._row(request, _LoopDelivery(loop, future))
        self._inbox.append(("add", row))
        if loop not in self._wake_due:  # one wake-up per tick, after its other tasks: their requests join
            self._wake_due.add(loop)
            loop.call_soon(self._wake_after_tick, loop)
        try:
            return await future
        except asyncio.CancelledError:
            self._post("abort", row.seq_id)
            raise

    def _wake_after_tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake_due.discard(loop)  # before the wake-up: a request posted after it schedules its own
        self._wake.set()

    async def update_weights(self, path: str, version: int) -> None:
        """Load weights once the running rows finish (new rows wait), then flush the prefix cache."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._post(
            "update", (path, version, lambda result: loop.call_soon_threadsafe(_settle, future, result))
        )
        await future

    async def health(self) -> bool:
        return self._worker.is_alive()

    # Synchronous API (benchmarks, scripts)

    def generate_sync(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Blocking: run `requests` together (continuously batched) and return their outputs in order."""
        futures = []
        for request in requests:
            self._validate(request)
            future: concurrent.futures.Future = concurrent.futures.Future()
            futures.append(future)
            self._inbox.append(("add", self._row(request, lambda result, f=future: _settle(f, result))))
        self._wake.set()
        return [future.result() for future in futures]

    def flush_cache(self) -> None:
        """Drop the prefix cache; only while no request is in flight (benchmarks between runs)."""
        assert self.scheduler.is_idle, "flush_cache while requests are in flight"
        self.blocks.flush()

    def close(self) -> None:
        """Stop the worker thread (requests still waiting are failed)."""
        self._post("stop", None)
        self._worker.join()

    @property
    def num_computed_tokens(self) -> int:
        """Real tokens passed through the model (uncached prefill + decode)."""
        return self.runner.num_computed_tokens

    @property
    def num_forward_passes(self) -> int:
        return self.runner.num_forward_passes

    def reset_peaks(self, *, trace: bool = False) -> None:
        """Start a new peak-KV measurement (benchmarks, between runs); `trace` also records every step."""
        self.blocks.reset_measures(trace=trace)

    @property
    def kv_trace(self) -> list[tuple[int, int, int]]:
        """Per forward step since `reset_peaks(trace=True)`: (running rows, KV slots of locked cached
        prefixes, KV slots the rows computed themselves)."""
        return list(self.blocks.kv_trace or ())

    @property
    def peak_kv_bytes(self) -> int:
        """Most KV bytes the running rows held at once (locked cached prefixes + their own tokens)."""
        return self.blocks.peak_active_tokens * self.blocks.pool.shape.bytes_per_token

    @property
    def peak_running_rows(self) -> int:
        """Most rows one forward step ran since `reset_peaks`."""
        return self.blocks.peak_rows

    @property
    def kv_token_steps(self) -> int:
        """KV slots the running rows held, summed over forward steps since `reset_peaks`."""
        return self.blocks.active_token_steps

    @property
    def radix(self):
        return self.blocks.radix

    @property
    def pool(self):
        return self.blocks.pool

    # Worker thread

    def _loop(self) -> None:
        while True:
            if not self._inbox and (self.scheduler.is_idle or not self.scheduler.running):
                self._wake.wait(timeout=None if self.scheduler.is_idle else 0.01)
                self._wake.clear()
            if not self._drain():
                return
            self._maybe_update_weights()
            if not self.scheduler.is_idle:
                self._step()

    def _drain(self) -> bool:
        """Apply the commands posted since the last step; False when told to stop."""
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                self.scheduler.add(payload)
            elif kind == "abort":
                if self.scheduler.abort(payload) is not None:
                    logger.debug("request %d aborted by its caller", payload)
            elif kind == "update":
                self._update = payload
                self.scheduler.is_admitting = False
            else:
                for row in self.scheduler.waiting:
                    row.deliver(EngineError("the embedded engine was closed"))
                return False
        return True

    def _step(self) -> None:
        rows = self.scheduler.schedule()
        if not rows:
            return
        try:
            samples = self._forward(rows)
        except Exception as error:  # the model failed, not the callers: fail the running rows only
            logger.exception("embedded engine step over %d rows failed", len(rows))
            for row in list(self.scheduler.running):
                self.scheduler.abort(row.seq_id)
                row.deliver(EngineError(f"embedded engine failed a step: {error}"))
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for row in self.scheduler.postprocess(rows, samples):
            output = self._output(row)
            if isinstance(row.deliver, _LoopDelivery):  # one wake-up per event loop per step
                by_loop.setdefault(row.deliver.loop, []).append((row.deliver.future, output))
            else:
                row.deliver(output)
        for loop, results in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, results)

    def _forward(self, rows: list[Row]) -> dict[int, tuple[int, float]]:
        """One model step over `rows`; returns seq_id -> (token, logprob) for the rows that sampled."""
        write_slots = self.blocks.allocate_step(rows)
        table_rows = [self.blocks.table_row[row.seq_id] for row in rows]
        batch = build_batch(
            rows, table_rows, self.blocks.slot_table, write_slots, dtype=self._dtype, device=self.device
        )
        logits = self.runner.step(batch)  # (R, V)
        sampling = [row for row in rows if row.num_computed + row.num_scheduled == len(row.token_ids)]
        if not sampling:
            return {}
        draws = [row.next_draw() for row in sampling]
        seeds, counters = int64_tensor([d[0] for d in draws]), int64_tensor([d[1] for d in draws])
        tokens, logprobs = sample_next(logits, self._sampling_batch(sampling), seeds, counters)
        pairs = zip(tokens.tolist(), logprobs.tolist(), strict=True)
        return {row.seq_id: pair for row, pair in zip(sampling, pairs, strict=True)}

    def _sampling_batch(self, rows: list[Row]) -> SamplingBatch:
        """The rows' sampling parameters, kept while the sampling rows are unchanged."""
        key = tuple(row.seq_id for row in rows)
        if self._sampling_key != key:
            self._sampling_key = key
            self._sampling_params = SamplingBatch.from_rows(
                [row.temperature for row in rows],
                [row.top_p for row in rows],
                [row.top_k for row in rows],
                vocab_size=self.vocab_size,
                device=self.device,
            )
        return self._sampling_params

    def _maybe_update_weights(self) -> None:
        if self._update is None or self.scheduler.running:
            return
        path, version, deliver = self._update
        self._update = None
        self.scheduler.is_admitting = True
        try:
            load_weights(self.model, read_state_dict(path))
        except Exception as error:  # bad file: the caller's ValueError, the engine keeps serving
            deliver(error)
            return
        self.blocks.flush()
        self._version = version
        logger.info("weights %s loaded as policy version %d", path, version)
        deliver(None)

    # Internal helpers

    def _post(self, kind: str, payload: Any) -> None:
        self._inbox.append((kind, payload))
        self._wake.set()

    def _row(self, request: GenerateRequest, deliver: Callable[[Any], None]) -> Row:
        return Row(
            token_ids=list(request.input_ids),
            max_new_tokens=request.max_new_tokens,
            stop_token_ids=self._eos_set.union(request.stop_token_ids)
            if request.stop_token_ids
            else self._eos_set,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=as_int64(request.seed) if request.seed is not None else secrets.randbits(63),
            deliver=deliver,
            priority=request.priority,
            keep_cached=request.keep_cached,
            segment_seeds=tuple(as_int64(seed) for seed in request.segment_seeds),
            segment_tokens=request.segment_tokens,
        )

    def _output(self, row: Row) -> GenerateOutput:
        output = GenerateOutput(
            output_ids=row.output_ids,
            logprobs=row.logprobs,
            finish_reason=row.finish_reason or "length",
            cached_tokens=row.num_cached_tokens,
            prefill_tokens=row.num_input_tokens - row.num_cached_tokens,
            policy_version=self._version,
        )
        self.counters.num_requests += 1
        self.counters.cached_tokens += output.cached_tokens
        self.counters.prefill_tokens += output.prefill_tokens
        self.counters.decoded_tokens += len(output.output_ids)
        return output

    def _validate(self, request: GenerateRequest) -> None:
        """Reject what the model cannot run before it is admitted, saying how to fix it."""
        ids = request.input_ids
        if min(ids) < 0 or max(ids) >= self.vocab_size:  # builtins: this runs for every request
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise EngineRequestError(f"input_ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        total = len(request.input_ids) + request.max_new_tokens
        if total > self._max_context:
            raise EngineRequestError(
                f"input ({len(request.input_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) = "
                f"{total} exceeds the model context of {self._max_context}; "
                "shorten the prompt or lower max_new_tokens"
            )
        if total - 1 > self.blocks.pool.capacity:
            raise EngineRequestError(
                f"input + max_new_tokens = {total} exceeds the KV token budget of {self.blocks.pool.capacity}; "
                "raise max_kv_tokens (TREEPO_MAX_KV_TOKENS) or lower max_new_tokens"
            )
        if not (math.isfinite(request.temperature) and request.temperature >= 0):
            raise EngineRequestError(f"temperature must be a finite number >= 0 (got {request.temperature})")
        if not 0 < request.top_p <= 1:
            raise EngineRequestError(f"top_p must be in (0, 1] (got {request.top_p})")
        if request.top_k != -1 and request.top_k < 1:
            raise EngineRequestError(f"top_k must be -1 (off) or >= 1 (got {request.top_k})")


@dataclass(slots=True, frozen=True)
class _LoopDelivery:
    """Resolves an asyncio future from the worker thread (`_step` batches these per event loop)."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def __call__(self, result: Any) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, result)


def _settle_all(results: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in results:
        _settle(future, result)


def _settle(future: asyncio.Future | concurrent.futures.Future, result: Any) -> None:
    """Resolve a caller's future with a result or an exception (no-op if the caller gave up)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


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
