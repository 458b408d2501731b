"""The deterministic (lockstep) schedule: the same seed gives the same batches, in the same order.

With prompts in flight while the trainer trains, which trees fill a batch and which policy version sampled
them depend on timing. Here the feeder submits a round of prompts only when the trainer needs trees (so
every fresh tree of step k is sampled by the weights pushed after step k-1), the whole round is read back,
sorted by sequence number and then scored and filtered in that order. The first surviving trees fill the
batch; survivors beyond what the step needs are carried, in order, to the next step (acked only after the
checkpoint of the step that trains them). Round sizes depend only on counts seen so far, which are
themselves deterministic. The price: sampling no longer overlaps training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from treepo.client.stream import StreamedTree
from treepo.trainer.consumer import Batch, BatchCounts, ScoredTree, TreeConsumer
from treepo.trainer.feeder import FEED_KEY, SEQ_KEY, Feeder
from treepo.trainer.rewards import RewardFn

logger = logging.getLogger(__name__)

MAX_ROUND_BATCHES = 4  # a round never submits more than this many batches' worth of prompts


def _order(item: StreamedTree) -> tuple[int, int, int]:
    """Publication order (stream entry id), ahead of this feeder's trees: trees of an earlier run first."""
    millis, _, number = item.entry_id.partition("-")
    return 0, int(millis), int(number or 0)


def tree_seq(tree: ScoredTree | StreamedTree) -> int:
    """The feeder's sequence number of a tree's prompt (-1 for trees the feeder did not number)."""
    seq = tree.tree.metadata.get(SEQ_KEY)
    return seq if isinstance(seq, int) else -1


@dataclass(slots=True)
class LockstepAssembler:
    """Assembles batches by submitting, reading back and admitting whole rounds in sequence order."""

    feeder: Feeder
    consumer: TreeConsumer
    max_staleness: int | None = None
    stall_timeout_s: float = 600.0
    carry: list[ScoredTree] = field(default_factory=list)  # kept trees waiting for the next step
    _read: int = 0
    _kept: int = 0

    def assemble(
        self,
        num_prompts: int,
        reward_fn: RewardFn,
        *,
        current_version: int,
        give_up: Callable[[Batch], bool],
    ) -> Batch:
        """The first `num_prompts` surviving trees in sequence order; `give_up(batch)` ends it early."""
        batch = Batch([], BatchCounts(), is_full=False)
        self._adopt_backlog(reward_fn, current_version, batch.counts)
        self._take_carry(batch, num_prompts, current_version)
        while len(batch.trees) < num_prompts:
            admitted = self._round(num_prompts - len(batch.trees), reward_fn, current_version)
            batch.counts.add(admitted.counts)
            need = num_prompts - len(batch.trees)
            batch.trees += admitted.trees[:need]
            self.carry += admitted.trees[need:]
            if len(batch.trees) < num_prompts and give_up(batch):
                break
        batch.is_full = len(batch.trees) >= num_prompts
        return batch

    def round_size(self, missing: int) -> int:
        """Prompts to submit for `missing` trees: scaled by the survival rate so far (starting at 1),
        so a round rarely overshoots (extra survivors are carried to the next step, one version old)."""
        rate = (self._kept + 1) / (self._read + 1)
        return min(
            math.ceil(missing / rate),
            MAX_ROUND_BATCHES * max(missing, self.feeder.request.prompts_per_request),
        )

    # Internal helpers

    def _is_ours(self, item: StreamedTree) -> bool:
        return item.tree.metadata.get(FEED_KEY) == self.feeder.feed_id

    def _adopt_backlog(self, reward_fn: RewardFn, version: int, counts: BatchCounts) -> None:
        """Trees this consumer held when it (or Redis) last stopped, i.e. the trees of the steps a crash
        lost: they go first, in publication order, before any new round is submitted, so the resumed run
        replays the lost steps (TreeConsumer.staleness) and fresh trees do not wait behind them."""
        stream = self.consumer.stream
        delivered: list[StreamedTree] = []
        while stream.has_backlog:
            delivered += stream.read_backlog(256)
        if not delivered:
            return
        delivered.sort(key=_order)
        admitted = self.consumer.admit(delivered, reward_fn, current_version=version)
        counts.add(admitted.counts)
        self.carry = admitted.trees + self.carry

    def _take_carry(self, batch: Batch, num_prompts: int, version: int) -> None:
        for tree in self.carry:
            tree.staleness = self.consumer.staleness(tree.tree.policy_version, version)
        too_old = self.max_staleness is not None
        stale = [t for t in self.carry if too_old and t.staleness > self.max_staleness]
        fresh = [t for t in self.carry if not (too_old and t.staleness > self.max_staleness)]
        if stale:
            self.consumer.discard_stale(stale)
            batch.counts.num_stale += len(stale)
        batch.trees += fresh[:num_prompts]
        self.carry = fresh[num_prompts:]

    def _round(self, missing: int, reward_fn: RewardFn, version: int) -> Batch:
        count = self.round_size(missing)
        failures_before = self.feeder.progress.failures()
        first = self.feeder.submit(count)
        delivered = self._read_round(first, count, failures_before)
        delivered.sort(
            key=lambda item: (1, tree_seq(item), item.tree.tree_id) if self._is_ours(item) else _order(item)
        )
        delivered, extra = self._one_per_prompt(delivered, range(first, first + count))
        admitted = self.consumer.admit(delivered, reward_fn, current_version=version)
        if extra:  # a re-submitted prompt whose first tree came after all: the first copy is trained
            self.consumer.stream.ack([item.entry_id for item in extra])
            admitted.counts.num_duplicates += len(extra)
        self._read += admitted.counts.num_read
        self._kept += len(admitted.trees)
        return admitted

    def _one_per_prompt(
        self, delivered: list[StreamedTree], wanted: range
    ) -> tuple[list[StreamedTree], list[StreamedTree]]:
        """Keep the first tree of each of this round's prompts (a re-submission may bring two)."""
        kept, extra, seen = [], [], set()
        for item in delivered:
            seq = tree_seq(item)
            if self._is_ours(item) and seq in wanted:
                if seq in seen:
                    extra.append(item)
                    continue
                seen.add(seq)
            kept.append(item)
        return kept, extra

    def _read_round(self, first: int, count: int, failures_before: int) -> list[StreamedTree]:
        """Read until every prompt of the round came back as a tree, a failure record or a corrupt entry;
        prompts the service lost (nothing produced for `feeder.lost_after_s`) are submitted again."""
        wanted = range(first, first + count)
        delivered: list[StreamedTree] = []
        corrupt_before = self.consumer.stream.num_corrupt
        last_progress = time.monotonic()
        while True:
            arrived = {
                tree_seq(item) for item in delivered if self._is_ours(item) and tree_seq(item) in wanted
            }
            lost = self.feeder.progress.failures() - failures_before
            lost += self.consumer.stream.num_corrupt - corrupt_before
            if len(arrived) + lost >= count:
                return delivered
            more = self.consumer.stream.read(count - len(arrived))
            if more:
                delivered += more
                last_progress = time.monotonic()
            elif self.feeder.silent_for() > self.feeder.lost_after_s:
                missing = [seq for seq in wanted if seq not in arrived]
                logger.warning("%d prompts of the round got no tree within %.0fs (did the service crash?): "
                               "submitting them again", len(missing), self.feeder.lost_after_s)  # fmt: skip
                self.feeder.resubmit(missing)
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.stall_timeout_s:
                raise RuntimeError(
                    f"{count - len(arrived) - lost} of {count} trees did not arrive within "
                    f"{self.stall_timeout_s:.0f}s; is the service sampling?"
                )
