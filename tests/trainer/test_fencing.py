"""Fenced training on the real Redis: a tree enters at most one committed step per group, even with two
live consumers; a consumer that lost its entry cannot claim or commit it; staleness is never negative."""

from __future__ import annotations

import time

import pytest
from test_consumer import MIXED, _tree

from treepo.client.constants import TREE_FIELD, trained_ledger, trees_stream
from treepo.client.stream import TreeStream
from treepo.trainer.consumer import TreeConsumer
from treepo.trainer.rewards import toy_reward


@pytest.fixture
def consumers(redis_url, key_prefix):
    made: list[TreeConsumer] = []

    def make(name: str, *, claim_idle_ms: int = 60_000, **kwargs) -> TreeConsumer:
        stream = TreeStream(redis_url, "job", name, key_prefix, block_ms=10, claim_idle_ms=claim_idle_ms)
        stream.ensure_group(start="0")  # these tests publish first, then read
        made.append(TreeConsumer(stream, **kwargs))
        return made[-1]

    yield make
    for consumer in made:
        consumer.stream.close()


def _publish(db, prefix: str, *tree_ids: str, version: int = 0) -> None:
    for tree_id in tree_ids:
        db.xadd(trees_stream(prefix), {TREE_FIELD: _tree(tree_id, MIXED, version).model_dump_json()})


def _take(consumer: TreeConsumer, count: int, version: int = 0):
    return consumer.assemble_batch(count, toy_reward, current_version=version, timeout_s=5)


class TestTwoConsumers:
    def test_a_duplicate_held_by_a_live_consumer_is_not_trained(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "a", "a")  # the producer published "a" twice
        first, second = consumers("c1"), consumers("c2")
        batch_1, batch_2 = first.claim(_take(first, 1)), second.claim(_take(second, 1))
        assert batch_1.tree_ids == ["a"] and batch_2.tree_ids == []
        assert batch_2.counts.num_duplicates == 1
        first.commit_batch(batch_1)
        assert db.hget(trained_ledger("job", key_prefix), "a") == "done"
        assert second.stream.pending() == 0

    def test_a_consumer_that_lost_its_entry_is_fenced_out(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "a")
        slow = consumers("slow")
        batch = _take(slow, 1)
        time.sleep(0.05)  # idle > claim_idle_ms: the taker presumes "slow" dead
        taker = consumers("taker", claim_idle_ms=1)
        taken = taker.claim(_take(taker, 1))
        assert taken.tree_ids == ["a"]
        assert slow.claim(batch).tree_ids == [] and slow.totals.num_fenced == 1
        assert slow.commit(batch.entry_ids, batch.tree_ids).statuses == ["fenced"]
        taker.commit_batch(taken)
        assert db.hget(trained_ledger("job", key_prefix), "a") == "done"

    def test_a_claim_taken_over_after_the_step_cannot_be_committed(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "a")
        dead = consumers("dead")
        batch = dead.claim(_take(dead, 1))  # claimed and trained, then the process hung
        time.sleep(0.05)
        taker = consumers("taker", claim_idle_ms=1)
        assert taker.claim(_take(taker, 1)).tree_ids == ["a"], "a dead owner's claim is overwritten"
        assert dead.commit(batch.entry_ids, batch.tree_ids).statuses == ["fenced"]

    def test_touch_keeps_a_slow_consumer_from_being_taken_over(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "a")
        slow = consumers("slow")
        batch = slow.claim(_take(slow, 1))
        time.sleep(0.05)
        assert slow.fence.touch(batch.entry_ids) == 1
        taker = consumers("taker", claim_idle_ms=30_000)
        assert _take(taker, 1).tree_ids == []
        assert slow.commit(batch.entry_ids, batch.tree_ids).statuses == ["committed"]

    def test_a_trained_tree_is_never_claimed_again(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "a")
        first = consumers("c1")
        batch = _take(first, 1)
        db.hset(trained_ledger("job", key_prefix), "a", "done")  # trained meanwhile (e.g. a resume)
        assert first.claim(batch).tree_ids == [] and first.stream.pending() == 0


class TestStaleness:
    def test_a_tree_newer_than_the_trainer_is_skipped_and_counted(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "future", version=10)
        _publish(db, key_prefix, "now", version=0)
        consumer = consumers("c1", max_staleness=1)
        batch = _take(consumer, 1, version=0)
        assert batch.tree_ids == ["now"] and batch.counts.num_future == 1

    @pytest.mark.parametrize(
        ("sampled", "current", "gaps", "expected"),
        [
            (3, 5, [], 2),
            (6, 5, [], -1),
            (4, 5, [(3, 5)], 0),  # sampled by a lost lineage, ahead of the replay: never negative
            (2, 5, [(3, 5)], 0),  # the checkpoint's version: the same weights as the resumed ones
            (1, 6, [(3, 5)], 2),
            (4, 7, [(3, 5)], 0),  # the lost lineage's 2nd weights vs the replay's 2nd: as before the crash
            (3, 8, [(3, 5)], 2),
            (5, 8, [(3, 5)], 3),
        ],
    )
    def test_staleness_skips_versions_lost_to_a_resume(self, consumers, sampled, current, gaps, expected):
        consumer = consumers("c1", version_gaps=gaps)
        assert consumer.staleness(sampled, current) == expected
