"""Continuous batching: which rows run in the next forward step (pure bookkeeping, never touches tensors).

A step feeds every running row its next tokens: one for a decoding row, a chunk of its input for a row
still prefilling. Waiting requests join at any step boundary while the running-row cap, the step's token
budget and the KV token budget (asked of the block manager) allow; finished rows leave at once. They join
in priority order (lower first, then arrival): the tree sampler gives a tree's requests its start order, so
the rows of trees already started, whose paths' prefixes sit in the cache, go before a new tree's first
ones and those prefixes are not evicted while their tree waits for its level. The slot manager hears of
every row that arrives and leaves, so it knows which priorities still have work in the engine.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Protocol

from treepo.service.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class SlotManager(Protocol):
    """What the scheduler asks of the KV side (implemented by `BlockManager`)."""

    def try_admit(self, seq: Sequence) -> bool: ...

    def cache_input(self, seq: Sequence) -> None: ...

    def release(self, seq: Sequence) -> None: ...

    def arrive(self, seq: Sequence) -> None: ...

    def leave(self, seq: Sequence) -> None: ...


@dataclass(slots=True)
class SchedulerConfig:
    max_running_rows: int = 256  # rows decoding together
    max_step_tokens: int = 2048  # tokens fed in one forward (decode rows + prefill chunks)
    min_shared_prefix_tokens: int = 4  # a waiting row sharing this many uncached tokens waits for them

    def __post_init__(self) -> None:
        if self.max_running_rows < 1:
            raise ValueError(f"max_running_rows must be >= 1 (got {self.max_running_rows})")
        if self.max_step_tokens < self.max_running_rows:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be >= max_running_rows")


class Scheduler:
    """A waiting queue and a running set; `schedule()` picks each step's rows and their token counts."""

    def __init__(self, slots: SlotManager, config: SchedulerConfig | None = None) -> None:
        self.slots = slots
        self.config = config or SchedulerConfig()
        self._waiting: list[tuple[int, int, Sequence]] = []  # heap of (priority, seq_id, row)
        self.running: list[Sequence] = []
        self.is_admitting = True  # False while a weight update drains the running rows

    # Public API

    def add(self, seq: Sequence) -> None:
        self.slots.arrive(seq)
        heapq.heappush(self._waiting, (seq.priority, seq.seq_id, seq))

    @property
    def waiting(self) -> list[Sequence]:
        """The waiting rows in admission order."""
        return [seq for _, _, seq in sorted(self._waiting)]

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop a request wherever it is; a running row gives its KV locks back."""
        for i, (_, waiting_id, seq) in enumerate(self._waiting):
            if waiting_id == seq_id:
                self._waiting[i] = self._waiting[-1]
                self._waiting.pop()
                heapq.heapify(self._waiting)
                self.slots.leave(seq)
                return seq
        for seq in self.running:
            if seq.seq_id == seq_id:
                self.running.remove(seq)
                self.slots.release(seq)
                self.slots.leave(seq)
                return seq
        return None

    @property
    def is_idle(self) -> bool:
        return not self._waiting and not self.running

    def schedule(self) -> list[Sequence]:
        """The rows of the next step, each with `num_scheduled` tokens to feed (running rows first)."""
        budget = self.config.max_step_tokens
        for seq in self.running:
            seq.num_scheduled = min(seq.num_uncomputed, max(1, budget - len(self.running)))
            budget -= seq.num_scheduled
        if self.is_admitting:
            self._admit(budget)
        return list(self.running)

    def postprocess(self, rows: list[Sequence], samples: dict[int, tuple[int, float]]) -> list[Sequence]:
        """Advance rows by the step; `samples` maps seq_id -> (token, logprob). Returns finished rows."""
        finished = []
        for seq in rows:
            was_prefilling = seq.is_prefilling
            seq.num_computed += seq.num_scheduled
            seq.num_scheduled = 0
            if was_prefilling and not seq.is_prefilling and seq.num_input_tokens - seq.num_cached_tokens > 1:
                # siblings arriving now hit the cache (a one-token tail saves them nothing: a request
                # always computes its last input token)
                self.slots.cache_input(seq)
            sample = samples.get(seq.seq_id)
            if sample is not None and seq.append(*sample):
                finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
            self.slots.release(seq)
            self.slots.leave(seq)
        return finished

    # Internal helpers

    def _admit(self, budget: int) -> None:
        deferred: list[tuple[int, int, Sequence]] = []
        need = self.config.min_shared_prefix_tokens
        computing = [seq for seq in self.running if _computes_input(seq, need)]
        while self._waiting and budget > 0 and len(self.running) < self.config.max_running_rows:
            entry = heapq.heappop(self._waiting)
            seq = entry[2]
            if computing and _shares_uncached_prefix(seq, computing, need):
                deferred.append(entry)  # its prefix is being computed by a running row: reuse it next step
                continue
            if not self.slots.try_admit(seq):
                deferred.append(entry)  # the KV budget is full: it stays first in line
                break
            seq.num_scheduled = min(seq.num_uncomputed, budget)
            budget -= seq.num_scheduled
            self.running.append(seq)
            if _computes_input(seq, need):
                computing.append(seq)
        for entry in deferred:
            heapq.heappush(self._waiting, entry)


def _computes_input(seq: Sequence, need: int) -> bool:
    """A row still prefilling >= `need` uncached input tokens (waiting siblings could reuse them)."""
    return seq.is_prefilling and seq.num_input_tokens - seq.num_cached_tokens >= need


def _shares_uncached_prefix(seq: Sequence, computing: list[Sequence], need: int) -> bool:
    """Whether a row still prefilling (`computing`) computes >= `need` tokens of `seq`'s input right now."""
    for other in computing:
        shared = _common_length(seq.token_ids, other.token_ids, other.num_input_tokens)
        if shared >= other.num_cached_tokens + need:
            return True
    return False


def _common_length(a: list[int], b: list[int], limit: int) -> int:
    n, limit = 0, min(len(a) - 1, limit)
    while n < limit and a[n] == b[n]:
        n += 1
    return n
