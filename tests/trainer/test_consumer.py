"""TreeConsumer on the real Redis: batches survive filtering and staleness, commits are idempotent,
a dead consumer's trees are taken over, corrupt entries go to the failures stream."""

from __future__ import annotations

import json
import time

import pytest
import redis

from treepo.client.constants import (
    FAILURE_FIELD,
    TREE_FIELD,
    failures_stream,
    rewards_key,
    trained_ledger,
    trees_stream,
)
from treepo.client.schema import Node, Tree
from treepo.client.stream import TreeStream
from treepo.trainer.advantages import tree_advantages
from treepo.trainer.consumer import TreeConsumer
from treepo.trainer.rewards import OverlongPenalty, toy_reward

MIXED, ALL_RIGHT, ALL_WRONG = (True, False), (True, True), (False, False)


def _tree(tree_id: str, correct: tuple[bool, ...], version: int = 0) -> Tree:
    """A root segment with one child per leaf; a leaf is correct when it boxes the answer 7."""
    nodes = [Node(id="1-0", parent=None, depth=1, token_ids=[1, 2], text="3 + 4 = 7\n")]
    for k, is_right in enumerate(correct):
        text = "\\boxed{7}" if is_right else "\\boxed{8}"
        nodes.append(
            Node(id=f"2-{k}", parent="1-0", depth=2, token_ids=[3] * (k + 1), text=text, finish_reason="eos")
        )
    leaves = [f"2-{k}" for k in range(len(correct))]
    return Tree(
        tree_id=tree_id,
        prompt_id="p",
        policy_version=version,
        metadata={"answer": "7"},
        nodes=nodes,
        leaves=leaves,
    )


@pytest.fixture
def client(redis_url):
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def make_consumer(redis_url, key_prefix):
    made: list[TreeConsumer] = []

    def make(name: str = "c1", *, claim_idle_ms: int = 60_000, **kwargs) -> TreeConsumer:
        stream = TreeStream(redis_url, "job", name, key_prefix, block_ms=10, claim_idle_ms=claim_idle_ms)
        stream.ensure_group(start="0")  # these tests publish first, then read
        consumer = TreeConsumer(stream, **kwargs)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.stream.close()


def _publish(client, prefix: str, *trees: Tree) -> list[str]:
    return [client.xadd(trees_stream(prefix), {TREE_FIELD: t.model_dump_json()}).decode() for t in trees]


class TestAssembleBatch:
    def test_filtered_prompts_are_counted_and_topped_up(self, make_consumer, client, key_prefix):
        _publish(
            client,
            key_prefix,
            _tree("a", MIXED),
            _tree("b", ALL_RIGHT),
            _tree("c", ALL_WRONG),
            _tree("d", MIXED),
            _tree("e", (False, True, False)),
            _tree("f", MIXED),
        )
        consumer = make_consumer()
        batch = consumer.assemble_batch(3, toy_reward, timeout_s=5)
        assert batch.is_full
        assert batch.tree_ids == ["a", "d", "e"]
        counts = batch.counts
        assert (counts.num_read, counts.num_kept, counts.num_filtered) == (5, 3, 2)
        assert (counts.num_all_correct, counts.num_all_wrong) == (1, 1)
        assert consumer.stream.pending() == 3  # filtered entries acked at once, kept ones await commit
        assert batch.trees[2].rewards == [-1.0, 1.0, -1.0]
        assert batch.trees[2].is_correct == [False, True, False]

    def test_filter_can_be_disabled(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", ALL_RIGHT))
        batch = make_consumer(enable_filter=False).assemble_batch(1, toy_reward, timeout_s=5)
        assert batch.tree_ids == ["a"]

    def test_paths_and_rewards_feed_tree_advantages(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", MIXED), _tree("b", (True, False, False)))
        batch = make_consumer().assemble_batch(2, toy_reward, timeout_s=5)
        assert batch.paths() == [
            ["a", "1-0", "2-0"],
            ["a", "1-0", "2-1"],
            ["b", "1-0", "2-0"],
            ["b", "1-0", "2-1"],
            ["b", "1-0", "2-2"],
        ]
        advantages = tree_advantages(batch.paths(), batch.rewards())
        assert advantages.shape == (5,)
        assert advantages[0] > 0 > advantages[1]

    def test_overlong_penalty_reaches_rewards(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", MIXED))
        consumer = make_consumer(overlong=OverlongPenalty(max_length=4, buffer=2))
        tree = consumer.assemble_batch(1, toy_reward, timeout_s=5).trees[0]
        assert tree.scores.lengths == [3, 4]
        assert tree.rewards == pytest.approx([1.0 - 0.5, -1.0 - 1.0])

    def test_timeout_returns_a_partial_batch(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", MIXED), _tree("b", ALL_WRONG))
        started = time.perf_counter()
        batch = make_consumer().assemble_batch(3, toy_reward, timeout_s=0.3)
        assert not batch.is_full
        assert batch.tree_ids == ["a"]
        assert 0.3 <= time.perf_counter() - started < 3

    def test_stale_trees_are_skipped_counted_and_acked(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("v3", MIXED, 3), _tree("v4", MIXED, 4), _tree("v5", MIXED, 5))
        consumer = make_consumer(max_staleness=1)
        batch = consumer.assemble_batch(2, toy_reward, current_version=5, timeout_s=5)
        assert batch.tree_ids == ["v4", "v5"]
        assert batch.counts.num_stale == 1
        assert batch.mean_staleness() == 0.5
        assert consumer.stream.pending() == 2

    def test_on_policy_only(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("old", MIXED, 0), _tree("new", MIXED, 1))
        batch = make_consumer(max_staleness=0).assemble_batch(1, toy_reward, current_version=1, timeout_s=5)
        assert batch.tree_ids == ["new"]
        assert batch.counts.num_stale == 1

    def test_corrupt_entry_goes_to_failures(self, make_consumer, client, key_prefix):
        client.xadd(trees_stream(key_prefix), {TREE_FIELD: b"{broken"})
        _publish(client, key_prefix, _tree("a", MIXED))
        consumer = make_consumer()
        batch = consumer.assemble_batch(1, toy_reward, timeout_s=5)
        assert batch.tree_ids == ["a"]
        assert batch.counts.num_corrupt == 1
        assert client.xlen(failures_stream(key_prefix)) == 1
        assert consumer.totals.num_corrupt == 1

    def test_empty_tree_is_skipped(self, make_consumer, client, key_prefix):
        empty = Tree(tree_id="e", prompt_id="p", policy_version=0, nodes=[], leaves=[])
        _publish(client, key_prefix, empty, _tree("a", MIXED))
        batch = make_consumer().assemble_batch(1, toy_reward, timeout_s=5)
        assert batch.tree_ids == ["a"]
        assert batch.counts.num_empty == 1

    def test_rewards_are_written_back_for_the_viewer(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", MIXED), _tree("b", ALL_WRONG), _tree("c", MIXED))
        make_consumer().assemble_batch(2, toy_reward, timeout_s=5)
        for tree_id, expected in [("a", {b"2-0": 1.0, b"2-1": -1.0}), ("b", {b"2-0": -1.0, b"2-1": -1.0})]:
            key = rewards_key(tree_id, key_prefix)
            assert {leaf: float(v) for leaf, v in client.hgetall(key).items()} == expected
            assert 0 < client.ttl(key) <= 24 * 3600

    def test_unscorable_tree_goes_to_failures(self, make_consumer, client, key_prefix):
        no_answer = _tree("x", MIXED).model_copy(update={"metadata": {}})
        _publish(client, key_prefix, no_answer, _tree("a", MIXED))
        consumer = make_consumer()
        batch = consumer.assemble_batch(1, toy_reward, timeout_s=5)
        assert batch.tree_ids == ["a"]
        assert batch.counts.num_unscorable == 1
        ((_, fields),) = client.xrange(failures_stream(key_prefix))
        record = json.loads(fields[FAILURE_FIELD.encode()])
        assert record["reason"] == "unscorable_tree"
        assert Tree.model_validate_json(record["fields"][TREE_FIELD]).tree_id == "x"  # kept whole
        assert consumer.stream.pending() == 1

    def test_misconfigured_reward_stops_after_a_few_trees(self, make_consumer, client, key_prefix):
        _publish(
            client, key_prefix, *[_tree(f"t{i}", MIXED).model_copy(update={"metadata": {}}) for i in range(5)]
        )
        with pytest.raises(RuntimeError, match="3 trees in a row could not be scored"):
            make_consumer(max_unscorable=3).assemble_batch(5, toy_reward, timeout_s=5)
        assert client.xlen(failures_stream(key_prefix)) == 3

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [({"max_staleness": -1}, "max_staleness"), ({"max_unscorable": 0}, "max_unscorable")],
    )
    def test_bad_settings(self, make_consumer, kwargs, message):
        with pytest.raises(ValueError, match=message):
            make_consumer(**kwargs)

    def test_bad_batch_size(self, make_consumer):
        with pytest.raises(ValueError, match="num_prompts"):
            make_consumer().assemble_batch(0, toy_reward)


class TestIdempotency:
    def test_commit_adds_to_ledger_and_acks(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", MIXED), _tree("b", MIXED))
        consumer = make_consumer()
        batch = consumer.assemble_batch(2, toy_reward, timeout_s=5)
        consumer.commit(batch.entry_ids, batch.tree_ids)
        assert consumer.stream.pending() == 0
        assert client.hgetall(trained_ledger("job", key_prefix)) == {b"a": b"done", b"b": b"done"}
        consumer.commit_batch(batch)  # re-commit on resume: harmless
        assert consumer.is_trained(["a", "b", "c"]) == [True, True, False]

    def test_redelivered_trained_tree_is_skipped(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", MIXED))
        consumer = make_consumer()
        consumer.commit_batch(consumer.assemble_batch(1, toy_reward, timeout_s=5))
        _publish(client, key_prefix, _tree("a", MIXED), _tree("b", MIXED))  # the producer retried "a"
        batch = consumer.assemble_batch(1, toy_reward, timeout_s=5)
        assert batch.tree_ids == ["b"]
        assert batch.counts.num_duplicates == 1
        assert consumer.totals.num_duplicates == 1
        assert consumer.stream.pending() == 1

    def test_duplicate_of_an_uncommitted_tree_is_skipped(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", MIXED), _tree("a", MIXED), _tree("b", MIXED))
        consumer = make_consumer()
        first = consumer.assemble_batch(1, toy_reward, timeout_s=5)
        second = consumer.assemble_batch(1, toy_reward, timeout_s=5)
        assert (first.tree_ids, second.tree_ids) == (["a"], ["b"])
        assert second.counts.num_duplicates == 1

    def test_dead_consumers_trees_are_taken_over_once(self, make_consumer, client, key_prefix):
        _publish(client, key_prefix, _tree("a", MIXED), _tree("b", MIXED), _tree("c", MIXED))
        dead = make_consumer("dead")
        held = dead.assemble_batch(2, toy_reward, timeout_s=5)  # then it dies before committing
        assert held.tree_ids == ["a", "b"]
        alive = make_consumer("alive", claim_idle_ms=50)
        time.sleep(0.1)
        batch = alive.assemble_batch(3, toy_reward, timeout_s=5)
        assert sorted(batch.tree_ids) == ["a", "b", "c"]
        alive.commit_batch(batch)
        assert alive.stream.pending() == 0
        # A late redelivery of a trained tree, e.g. the dead consumer's restart: skipped, not retrained.
        _publish(client, key_prefix, _tree("a", MIXED))
        again = make_consumer("dead").assemble_batch(1, toy_reward, timeout_s=0.2)
        assert again.tree_ids == []
        assert again.counts.num_duplicates == 1
