"""A trainer that survives its neighbours, on the real Redis: after a Redis restart (a new run_id) what the
AOF's last second may have lost is committed again before anything is read, and a lost delivery that comes
back is kept, not acked; a resume under a new name takes the old consumer's entries over; a wrong
entries-read is repaired; prompts the service never answered are written off; a re-submitted prompt is
trained once."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from test_consumer import MIXED, _tree
from test_fencing import _publish, _take

from treepo.client.constants import trained_ledger, trees_stream
from treepo.client.schema import SamplingParams, TreeParams
from treepo.client.stream import StreamedTree, TreeStream, repair_entries_read
from treepo.service.task import iter_problems
from treepo.trainer.consumer import TreeConsumer
from treepo.trainer.feeder import FEED_KEY, SEQ_KEY, Feeder, FeedRequest, StreamProgress
from treepo.trainer.lockstep import LockstepAssembler
from treepo.trainer.rewards import toy_reward


@pytest.fixture
def consumers(redis_url, key_prefix):
    made: list[TreeConsumer] = []

    def make(name: str) -> TreeConsumer:
        stream = TreeStream(redis_url, "job", name, key_prefix, block_ms=10)
        stream.ensure_group(start="0")  # these tests publish first, then read
        made.append(TreeConsumer(stream))
        return made[-1]

    yield make
    for consumer in made:
        consumer.stream.close()


def _redis_restarted(consumer) -> None:
    """What the stream sees after a restart: another server run_id than the one it knew."""
    consumer.stream._run_id = "the-server-before-the-crash"


def _roll_back_delivery(db, prefix: str, *entry_ids: str) -> None:
    """The AOF lost the delivery of these entries: not pending, and the group's cursor before them."""
    stream = trees_stream(prefix)
    db.xack(stream, "job", *entry_ids)
    db.xgroup_setid(stream, "job", "0")


class TestRedisRestart:
    def test_a_lost_commit_is_committed_again_before_anything_is_read(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "a", "b")
        consumer = consumers("c1")
        batch = consumer.claim(_take(consumer, 2))
        consumer.commit_batch(batch)
        # The AOF lost the commit but kept the claims and deliveries: the trees look claimed, not trained.
        stream, ledger = trees_stream(key_prefix), trained_ledger("job", key_prefix)
        db.hset(
            ledger, mapping={t: f"claim|c1|{e}" for t, e in zip(batch.tree_ids, batch.entry_ids, strict=True)}
        )
        db.xgroup_setid(stream, "job", "0")
        db.xreadgroup("job", "c1", {stream: ">"})
        assert db.xpending(stream, "job")["pending"] == 2
        _redis_restarted(consumer)

        again = consumer.assemble_batch(2, toy_reward, timeout_s=0.5)
        assert again.trees == [], "re-committed on noticing the restart, so not trained again"
        assert db.hgetall(ledger) == {"a": "done", "b": "done"}
        assert db.xpending(stream, "job")["pending"] == 0

    def test_a_read_retried_on_the_new_server_cannot_train_a_lost_commit_twice(
        self, consumers, db, key_prefix
    ):
        _publish(db, key_prefix, "a")
        consumer = consumers("c1")
        consumer.commit_batch(consumer.claim(_take(consumer, 1)))
        db.hdel(trained_ledger("job", key_prefix), "a")  # the AOF lost delivery, claim and commit
        db.xgroup_setid(trees_stream(key_prefix), "job", "0")
        _redis_restarted(consumer)
        # redis-py re-sends a blocked XREADGROUP to the new server before the stream can notice the restart.
        batch = consumer.admit(consumer.stream._read_new(1, None), toy_reward)
        assert batch.tree_ids == ["a"]
        assert consumer.claim(batch).trees == [], "the restart is noticed (and the commit redone) first"
        assert db.hget(trained_ledger("job", key_prefix), "a") == "done"

    def test_a_lost_delivery_of_a_held_tree_is_kept_for_its_commit(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "a")
        consumer = consumers("c1")
        batch = _take(consumer, 1)  # held (lockstep carry, or an uncommitted step)
        _roll_back_delivery(db, key_prefix, *batch.entry_ids)
        _redis_restarted(consumer)

        again = consumer.assemble_batch(1, toy_reward, timeout_s=0.5)
        assert again.trees == [] and again.counts.num_duplicates == 0, "redelivered: kept pending, not acked"
        claimed = consumer.claim(batch)
        assert claimed.tree_ids == ["a"]
        consumer.commit_batch(claimed)
        assert db.hget(trained_ledger("job", key_prefix), "a") == "done"
        assert db.xpending(trees_stream(key_prefix), "job")["pending"] == 0

    def test_a_commit_whose_claim_and_delivery_were_lost_still_lands(self, consumers, db, key_prefix):
        _publish(db, key_prefix, "a")
        consumer = consumers("c1")
        batch = consumer.claim(_take(consumer, 1))
        db.hdel(trained_ledger("job", key_prefix), "a")
        _roll_back_delivery(db, key_prefix, *batch.entry_ids)
        assert consumer.commit(batch.entry_ids, batch.tree_ids).statuses == ["committed"]
        assert db.hget(trained_ledger("job", key_prefix), "a") == "done", "its step is in the checkpoint"


def test_a_resume_under_another_name_takes_the_old_consumers_trees(consumers, db, key_prefix):
    _publish(db, key_prefix, "a", "b")
    old = consumers("old")
    held = _take(old, 2)
    new = consumers("new")
    assert new.stream.take_over("old") == 2
    batch = new.claim(_take(new, 2))
    assert sorted(batch.tree_ids) == ["a", "b"] and batch.entry_ids == held.entry_ids
    assert all(
        c["pending"] == 0 for c in db.xinfo_consumers(trees_stream(key_prefix), "job") if c["name"] == "old"
    )


def test_a_wrong_entries_read_is_repaired(consumers, db, key_prefix):
    _publish(db, key_prefix, "a", "b", "c")
    consumer = consumers("c1")
    consumer.stream.read(2)
    stream = trees_stream(key_prefix)
    last = db.xinfo_groups(stream)[0]["last-delivered-id"]
    db.execute_command("XGROUP", "SETID", stream, "job", last, "ENTRIESREAD", 0)  # what an AOF reload left
    assert db.xinfo_groups(stream)[0]["lag"] == 3
    assert repair_entries_read(db, stream, "job") == 2
    assert db.xinfo_groups(stream)[0]["lag"] == 1
    assert repair_entries_read(db, stream, "job") is None, "right already: left alone"


def test_prompts_the_service_never_answered_are_written_off(redis_url, key_prefix):
    progress = StreamProgress(redis_url, key_prefix, "job")
    request = FeedRequest(TreeParams(width=2, branch=2), SamplingParams())
    feeder = Feeder(None, iter_problems("train"), request, progress, target=4, lost_after_s=60)  # type: ignore[arg-type]
    feeder.submitted = 4  # accepted, then the service crashed and lost them
    assert feeder.write_off_lost() == 0 and feeder.outstanding() == 4, "not silent for lost_after_s yet"
    feeder._last_change -= 61
    assert feeder.write_off_lost() == 4 and feeder.outstanding() == 0, "top_up submits new prompts"
    progress.close()


@pytest.mark.parametrize("late_first", [False, True])
def test_a_resubmitted_prompt_is_trained_once(late_first: bool) -> None:
    def tree(seq: int, tree_id: str, entry: str) -> StreamedTree:
        item = _tree(tree_id, MIXED)
        item.metadata.update({SEQ_KEY: seq, FEED_KEY: "f"})
        return StreamedTree(entry, item)

    lockstep = LockstepAssembler(SimpleNamespace(feed_id="f"), None)  # type: ignore[arg-type]
    copies = [tree(0, "original", "1-0"), tree(0, "again", "2-0")]
    delivered = [
        tree(-1, "older-run", "0-5"),
        *(reversed(copies) if late_first else copies),
        tree(1, "x", "3-0"),
    ]
    kept, extra = lockstep._one_per_prompt(delivered, range(0, 2))
    assert [t.tree.tree_id for t in kept] == ["older-run", copies[1 if late_first else 0].tree.tree_id, "x"]
    assert len(extra) == 1


class _LossyFeeder:
    """Plays feeder and service: publishes each submitted prompt's tree except `lost` ones (a service
    crash lost them), and those again when they are re-submitted."""

    def __init__(self, db, prefix: str, lost: set[int]) -> None:
        self.db, self.prefix, self.lost = db, prefix, lost
        self.feed_id, self.submitted, self.resubmitted = "f", 0, []
        self.request = SimpleNamespace(prompts_per_request=8)
        self.progress = SimpleNamespace(failures=lambda: 0)
        self.lost_after_s = 0.2
        self._last = time.monotonic()

    def submit(self, count: int) -> int:
        first, self.submitted = self.submitted, self.submitted + count
        self._publish([seq for seq in range(first, first + count) if seq not in self.lost])
        return first

    def resubmit(self, seqs: list[int]) -> None:
        self.resubmitted += seqs
        self._publish(seqs)

    def silent_for(self) -> float:
        return time.monotonic() - self._last

    def _publish(self, seqs: list[int]) -> None:
        for seq in seqs:
            tree = _tree(f"t{seq}-{len(self.resubmitted)}", MIXED)
            tree.metadata.update({SEQ_KEY: seq, FEED_KEY: self.feed_id})
            self.db.xadd(trees_stream(self.prefix), {"tree": tree.model_dump_json()})
        self._last = time.monotonic()


def test_the_lockstep_round_resubmits_what_the_service_lost(consumers, db, key_prefix) -> None:
    feeder = _LossyFeeder(db, key_prefix, lost={1})
    lockstep = LockstepAssembler(feeder, consumers("c1"), stall_timeout_s=30)  # type: ignore[arg-type]
    batch = lockstep.assemble(3, toy_reward, current_version=0, give_up=lambda _: False)
    assert feeder.resubmitted == [1], "the lost prompt, and only it, was submitted again"
    assert [t.tree.metadata[SEQ_KEY] for t in batch.trees] == [0, 1, 2], "the round completed, in order"
