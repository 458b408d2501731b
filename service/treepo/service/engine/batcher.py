"""Merge concurrent `generate()` calls (many trees, many HTTP requests) into shared inner engine calls.

Requests that arrive while the inner engine is busy accumulate and go together in its next call; callers of
the same event-loop tick always share a call. One inner call runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from treepo.service.engine.protocol import Engine, EngineWrapper, GenerateOutput, GenerateRequest

logger = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class BatchRecord:
    """One inner engine call, as listeners (metrics, benchmarks) see it."""

    batch_id: int
    requests: Sequence[GenerateRequest]
    outputs: Sequence[GenerateOutput]
    num_callers: int
    seconds: float

    @property
    def size(self) -> int:
        return len(self.requests)


BatchListener = Callable[[BatchRecord], None]


@dataclass(slots=True)
class _Call:
    requests: list[GenerateRequest]
    future: asyncio.Future
    outputs: list[GenerateOutput | None]
    batch_ids: list[int] = field(default_factory=list)
    dispatched: int = 0  # requests already handed to the inner engine
    answered: int = 0


class BatchingEngine(EngineWrapper):
    """An `Engine` wrapping another: concurrent callers share inner calls of <= `max_batch_size` requests.

    An inner failure fails exactly the callers that had requests in that call.
    """

    def __init__(self, inner: Engine, *, max_batch_size: int | None = None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 or None for no limit (got {max_batch_size})")
        super().__init__(inner)
        self.max_batch_size = max_batch_size
        self.num_batches = 0
        self.num_requests = 0
        self.max_batch_seen = 0
        self._queue: deque[_Call] = deque()
        self._worker: asyncio.Task | None = None
        self._listeners: list[BatchListener] = []

    # Public API

    def add_listener(self, listener: BatchListener) -> None:
        """Call `listener(record)` after every inner call (e.g. a batch-size histogram)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: BatchListener) -> None:
        self._listeners.remove(listener)

    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        outputs, _ = await self.generate_tracked(requests)
        return outputs

    async def generate_tracked(
        self, requests: Sequence[GenerateRequest]
    ) -> tuple[list[GenerateOutput], tuple[int, ...]]:
        """Like `generate`, plus the ids of the inner calls that served these requests."""
        if not requests:
            return [], ()
        loop = asyncio.get_running_loop()
        call = _Call(list(requests), loop.create_future(), [None] * len(requests))
        self._queue.append(call)  # before any await: same-tick callers land in the same batch
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._worker = loop.create_task(self._drain())
        return await call.future

    def __getattr__(self, name: str) -> Any:
        """Everything else (tokenizer, counters of the inner engine, ...) is the inner engine's."""
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # Internal helpers

    async def _drain(self) -> None:
        await asyncio.sleep(0)  # let callers of this tick enqueue first
        while self._queue:
            parts = self._take_batch()
            if parts:
                await self._dispatch(parts)

    def _take_batch(self) -> list[tuple[_Call, int, int]]:
        """(call, start, end) slices of queued calls, FIFO, up to `max_batch_size` requests in all."""
        cap = self.max_batch_size or float("inf")
        parts: list[tuple[_Call, int, int]] = []
        taken = 0
        while self._queue and taken < cap:
            call = self._queue[0]
            if call.future.done():  # cancelled, or failed in an earlier batch
                self._queue.popleft()
                continue
            count = int(min(cap - taken, len(call.requests) - call.dispatched))
            parts.append((call, call.dispatched, call.dispatched + count))
            call.dispatched += count
            taken += count
            if call.dispatched == len(call.requests):
                self._queue.popleft()
        return parts

    async def _dispatch(self, parts: list[tuple[_Call, int, int]]) -> None:
        requests = [request for call, start, end in parts for request in call.requests[start:end]]
        batch_id = self.num_batches
        self.num_batches += 1
        started = time.perf_counter()
        try:
            outputs = await self.inner.generate(requests)
            if len(outputs) != len(requests):
                raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(requests)} requests")
        except asyncio.CancelledError:
            for call, _, _ in parts:
                call.future.cancel()
            raise
        except Exception as exc:
            logger.warning("engine call %d (%d requests) failed: %r", batch_id, len(requests), exc)
            for call, _, _ in parts:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        self._deliver(parts, outputs, batch_id)
        self._record(BatchRecord(batch_id, requests, outputs, len(parts), time.perf_counter() - started))

    def _deliver(
        self, parts: list[tuple[_Call, int, int]], outputs: list[GenerateOutput], batch_id: int
    ) -> None:
        position = 0
        for call, start, end in parts:
            call.outputs[start:end] = outputs[position : position + end - start]
            position += end - start
            call.answered += end - start
            call.batch_ids.append(batch_id)
            if call.answered == len(call.requests) and not call.future.done():
                call.future.set_result((call.outputs, tuple(call.batch_ids)))

    def _record(self, record: BatchRecord) -> None:
        self.num_requests += record.size
        self.max_batch_seen = max(self.max_batch_seen, record.size)
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:
                logger.exception("batch listener %r failed", listener)
