"""Trainer-side queue logic: assemble a batch of scored trees, claim it, then commit it after the checkpoint.

At-least-once delivery (TreeStream) plus a fenced ledger (fencing.py: a Redis hash tree id -> claim/done)
means no tree is lost and none is trained twice, even by two consumers of one group. Trees that cannot
be trained (already trained, too stale or from the future, filtered by DAPO dynamic sampling, corrupt)
are counted and acked at once; kept trees are claimed right before the optimizer step (`claim`) and
marked done + acked by `commit` only after the checkpoint of the step that used them is saved.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from treepo.client.constants import TREE_FIELD, rewards_key, trained_ledger
from treepo.client.schema import Tree
from treepo.client.stream import StreamedTree, TreeStream
from treepo.trainer.fencing import DONE, Fence, FenceResult
from treepo.trainer.rewards import OverlongPenalty, RewardFn, TreeScores, dynamic_filter, score_tree

logger = logging.getLogger(__name__)

RECOMMIT_S = 30.0  # commits this recent (and always the last RECOMMIT_MIN) are re-committed after a restart
RECOMMIT_MIN = 3


@dataclass(slots=True)
class ScoredTree:
    """A kept tree, its stream entry and its leaves' scores (in `tree.leaves` order)."""

    entry_id: str
    tree: Tree
    scores: TreeScores
    staleness: int  # policy versions between the tree's sampling weights and the trained weights

    @property
    def rewards(self) -> list[float]:
        return self.scores.rewards

    @property
    def is_correct(self) -> list[bool]:
        return [score > 0 for score in self.scores.scores]

    def paths(self) -> list[list[str]]:
        """Each leaf's [tree_id, node ids from the root's child to the leaf], for tree_advantages."""
        return [[self.tree.tree_id, *(node.id for node in self.tree.path(leaf))] for leaf in self.tree.leaves]


@dataclass(slots=True)
class BatchCounts:
    """What happened to the entries read while assembling a batch."""

    num_read: int = 0
    num_kept: int = 0
    num_duplicates: int = 0  # already trained (ledger) or already in an uncommitted batch
    num_stale: int = 0
    num_future: int = 0  # sampled with a newer policy version than the trainer's: an error, skipped
    num_fenced: int = 0  # lost to another consumer of the group before the optimizer step
    num_filtered: int = 0  # DAPO dynamic sampling: all leaves scored the same
    num_all_correct: int = 0
    num_all_wrong: int = 0
    num_corrupt: int = 0
    num_empty: int = 0  # trees without leaves: nothing to train on
    num_unscorable: int = 0  # the reward function raised ValueError: moved to the failures stream

    def add(self, other: BatchCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class Batch:
    trees: list[ScoredTree]
    counts: BatchCounts
    is_full: bool  # False when the timeout ended assembly early

    @property
    def entry_ids(self) -> list[str]:
        return [t.entry_id for t in self.trees]

    @property
    def tree_ids(self) -> list[str]:
        return [t.tree.tree_id for t in self.trees]

    def paths(self) -> list[list[str]]:
        return [path for t in self.trees for path in t.paths()]

    def rewards(self) -> list[float]:
        return [reward for t in self.trees for reward in t.rewards]

    def mean_staleness(self) -> float:
        return sum(t.staleness for t in self.trees) / len(self.trees) if self.trees else 0.0


@dataclass(slots=True)
class TreeConsumer:
    """Pulls trees off a TreeStream for one training job (consumer group)."""

    stream: TreeStream
    max_staleness: int | None = None  # None: any age; 0: strictly on-policy
    enable_filter: bool = True
    overlong: OverlongPenalty | None = None
    rewards_ttl_s: int | None = 24 * 3600  # leaf rewards written back for the tree viewer; None: off
    max_unscorable: int = 8  # this many unscorable trees in a row means a misconfigured reward: stop
    # (first, last) policy versions that stand for the weights of version first - 1 (a resume), see
    # `staleness`.
    version_gaps: list[tuple[int, int]] = field(default_factory=list)
    totals: BatchCounts = field(default_factory=BatchCounts)
    fence: Fence = field(init=False)
    _num_unscorable_in_a_row: int = 0
    _uncommitted: dict[str, str] = field(default_factory=dict)  # tree id -> entry id, handed out
    # (time, entry ids, tree ids, claimant) of recent commits: a Redis restart may have lost them
    _recent: deque[tuple[float, list[str], list[str], str | None]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None (got {self.max_staleness})")
        if self.max_unscorable < 1:
            raise ValueError(f"max_unscorable must be >= 1 (got {self.max_unscorable})")
        stream = self.stream
        self.fence = Fence(stream.redis, stream.stream, self.ledger, stream.group, stream.consumer)
        stream.on_restart = self.recommit_recent

    @property
    def ledger(self) -> str:
        return trained_ledger(self.stream.group, self.stream.prefix)

    # Public API

    def assemble_batch(
        self,
        num_prompts: int,
        reward_fn: RewardFn,
        *,
        current_version: int = 0,
        timeout_s: float | None = None,
    ) -> Batch:
        """Read until `num_prompts` trees survive dedup, staleness and scoring + filtering, topping up
        from the queue; returns early (is_full=False) when `timeout_s` passes first."""
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 (got {num_prompts})")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        counts, kept = BatchCounts(), []
        corrupt_before = self.stream.num_corrupt
        while len(kept) < num_prompts and (deadline is None or time.monotonic() < deadline):
            delivered = self.stream.read(num_prompts - len(kept))
            counts.num_read += len(delivered)
            kept += self._admit(delivered, reward_fn, current_version, counts)
        counts.num_corrupt = self.stream.num_corrupt - corrupt_before
        counts.num_kept = len(kept)
        self.totals.add(counts)
        self._uncommitted.update((t.tree.tree_id, t.entry_id) for t in kept)
        return Batch(kept, counts, is_full=len(kept) >= num_prompts)

    def claim(self, batch: Batch) -> Batch:
        """Fence the batch right before its optimizer step (fencing.py): keep only the trees this
        consumer could claim; ack copies of trees already trained or claimed by a live consumer."""
        self.stream.check_server()  # a Redis restart's lost commits are redone before anything is claimed
        result = self.fence.claim(batch.entry_ids, batch.tree_ids)
        kept = [t for t, s in zip(batch.trees, result.statuses, strict=True) if s == "claimed"]
        dup = [t for t, s in zip(batch.trees, result.statuses, strict=True) if s in ("trained", "busy")]
        lost = [t for t, s in zip(batch.trees, result.statuses, strict=True) if s == "lost"]
        if dup or lost:
            logger.warning("fenced %d trees out of the step: %d trained or claimed elsewhere, %d taken over",
                           len(dup) + len(lost), len(dup), len(lost))  # fmt: skip
        self.stream.ack([t.entry_id for t in dup])
        self.stream.forget([t.entry_id for t in lost])
        self._settle(t.tree.tree_id for t in dup + lost)
        counts = BatchCounts(num_duplicates=len(dup), num_fenced=len(lost))
        self.totals.add(counts)
        batch.counts.add(counts)
        return Batch(kept, batch.counts, batch.is_full and not (dup or lost))

    def commit(
        self, entry_ids: Sequence[str], tree_ids: Sequence[str], *, claimant: str | None = None
    ) -> FenceResult:
        """Mark claimed trees trained and ack their entries, atomically (fencing.py). Call it after the
        checkpoint of the step that used them is saved; calling it again (on resume) is harmless."""
        result = self.fence.commit(list(entry_ids), list(tree_ids), claimant=claimant)
        if num_fenced := result.count("fenced"):
            logger.warning("%d trees were fenced out at commit: another consumer took them over", num_fenced)
        self.stream.forget(entry_ids)
        self._settle(tree_ids)
        now = time.monotonic()
        self._recent.append((now, list(entry_ids), list(tree_ids), claimant))
        while len(self._recent) > RECOMMIT_MIN and now - self._recent[0][0] > RECOMMIT_S:
            self._recent.popleft()
        return result

    def recommit_recent(self) -> None:
        """After a Redis restart (TreeStream.on_restart): AOF `everysec` may have lost the last second of
        commits, and their trees would come back as untrained; commit them again (idempotent)."""
        for _, entry_ids, tree_ids, claimant in self._recent:
            result = self.fence.commit(entry_ids, tree_ids, claimant=claimant)
            if redone := result.count("committed"):
                logger.warning("re-committed %d trees whose commit a Redis restart lost", redone)

    def commit_batch(self, batch: Batch) -> None:
        self.commit(batch.entry_ids, batch.tree_ids)

    def admit(self, delivered: list[StreamedTree], reward_fn: RewardFn, *, current_version: int = 0) -> Batch:
        """Score and filter already-read entries in the order given (the lockstep schedule reads a whole
        round, sorts it, then admits it); kept trees count as handed out until committed."""
        counts = BatchCounts(num_read=len(delivered))
        kept = self._admit(delivered, reward_fn, current_version, counts)
        counts.num_kept = len(kept)
        self.totals.add(counts)
        self._uncommitted.update((t.tree.tree_id, t.entry_id) for t in kept)
        return Batch(kept, counts, is_full=True)

    def discard_stale(self, trees: Sequence[ScoredTree]) -> None:
        """Ack kept-but-unused trees that grew too old to train (counted as stale)."""
        self.stream.ack([t.entry_id for t in trees])
        self._settle(t.tree.tree_id for t in trees)
        self.totals.num_stale += len(trees)

    def is_trained(self, tree_ids: Iterable[str]) -> list[bool]:
        return [state == DONE for state in self.fence.states(list(tree_ids))]

    def staleness(self, sampled_version: int, current_version: int) -> int:
        """Policy versions between a tree's sampling weights and the weights being trained; negative: the
        tree is newer than our weights (an error).

        A resume leaves a gap (first, last) in the versions: first..last-1 were sampled by a lineage lost
        with the crash, `last` is the version the checkpoint's weights were pushed under again. The resumed
        run trains the lost steps' redelivered trees first, in their order: it replays those steps, so its
        k-th step stands where the lost lineage's k-th step stood and a tree sampled by the lost lineage's
        j-th weights counts as sampled by the replay's j-th (as stale as it was before the crash, never
        negative)."""
        if sampled_version > current_version:
            return current_version - sampled_version
        stale = self._effective(current_version) - self._effective(sampled_version)
        lost = any(first <= sampled_version < last for first, last in self.version_gaps)
        return max(stale, 0) if lost else stale

    def _effective(self, version: int) -> int:
        """The version in the replayed lineage: each gap's pushed version stands for first - 1."""
        effective = version
        for first, last in self.version_gaps:
            if version >= last:
                effective -= last - first + 1
        return effective

    # Internal helpers

    def _admit(
        self, delivered: list[StreamedTree], reward_fn: RewardFn, current_version: int, counts: BatchCounts
    ) -> list[ScoredTree]:
        """Keep what can be trained; ack everything else at once."""
        kept: list[ScoredTree] = []
        scored_all: list[ScoredTree] = []
        skipped: list[str] = []
        trained = self.is_trained(item.tree.tree_id for item in delivered)
        seen = dict(self._uncommitted)
        for item, is_trained in zip(delivered, trained, strict=True):
            tree = item.tree
            staleness = self.staleness(tree.policy_version, current_version)
            if seen.get(tree.tree_id) == item.entry_id:
                # Redelivered after a Redis restart lost the delivery: we still hold it, keep it pending.
                logger.info("entry %s (tree %s) came back after a Redis restart", item.entry_id, tree.tree_id)
                continue
            if is_trained or tree.tree_id in seen:
                counts.num_duplicates += 1
                logger.info("skipping tree %s (entry %s): already trained", tree.tree_id, item.entry_id)
            elif not tree.leaves:
                counts.num_empty += 1
                logger.warning("skipping tree %s (entry %s): it has no leaves", tree.tree_id, item.entry_id)
            elif staleness < 0:
                counts.num_future += 1
                logger.error("skipping tree %s: sampled with policy version %d, newer than the trainer's %d",
                             tree.tree_id, tree.policy_version, current_version)  # fmt: skip
            elif self.max_staleness is not None and staleness > self.max_staleness:
                counts.num_stale += 1
            elif (scored := self._score(item, reward_fn, staleness, counts)) is None:
                continue  # quarantined
            else:
                scored_all.append(scored)
                if self._passes_filter(scored, counts):
                    kept.append(scored)
                    seen[tree.tree_id] = item.entry_id
                    continue
            skipped.append(item.entry_id)
        self.stream.ack(skipped)
        self._report_rewards(scored_all)
        return kept

    def _settle(self, tree_ids: Iterable[str]) -> None:
        for tree_id in tree_ids:
            self._uncommitted.pop(tree_id, None)

    def _score(
        self, item: StreamedTree, reward_fn: RewardFn, staleness: int, counts: BatchCounts
    ) -> ScoredTree | None:
        """Score a tree; one the reward function rejects (ValueError) goes to the failures stream."""
        try:
            scores = score_tree(item.tree, reward_fn, self.overlong)
        except ValueError as error:
            counts.num_unscorable += 1
            self._num_unscorable_in_a_row += 1
            self.stream.quarantine(
                item.entry_id, "unscorable_tree", error, {TREE_FIELD: item.tree.model_dump_json()}
            )
            if self._num_unscorable_in_a_row >= self.max_unscorable:
                raise RuntimeError(
                    f"{self._num_unscorable_in_a_row} trees in a row could not be scored (last: {error}); "
                    "check the reward function and the prompt metadata (the trees are on the failures stream)"
                ) from error
            return None
        self._num_unscorable_in_a_row = 0
        return ScoredTree(item.entry_id, item.tree, scores, staleness)

    def _report_rewards(self, scored: list[ScoredTree]) -> None:
        """Write leaf rewards back so the service's tree viewer can colour leaves."""
        if self.rewards_ttl_s is None or not scored:
            return
        pipe = self.stream.redis.pipeline(transaction=False)
        for item in scored:
            key = rewards_key(item.tree.tree_id, self.stream.prefix)
            pipe.hset(key, mapping=dict(zip(item.scores.leaf_ids, item.rewards, strict=True)))
            pipe.expire(key, self.rewards_ttl_s)
        pipe.execute()

    def _passes_filter(self, scored: ScoredTree, counts: BatchCounts) -> bool:
        if not self.enable_filter:
            return True
        result = dynamic_filter([scored.scores.scores])
        counts.num_filtered += result.num_filtered
        counts.num_all_correct += result.num_all_correct
        counts.num_all_wrong += result.num_all_wrong
        return bool(result.kept)
