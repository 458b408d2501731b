"""TreeStream on the real Redis: delivery, takeover of a dead consumer, restarts, corrupt entries."""

from __future__ import annotations

import json
import time

import pytest
import redis

from treepo.client.constants import FAILURE_FIELD, TREE_FIELD, failures_stream, trees_stream
from treepo.client.schema import Node, Tree
from treepo.client.stream import TreeStream


def _tree(tree_id: str) -> Tree:
    node = Node(id="1-0", parent=None, depth=1, token_ids=[1, 2], text="hi", finish_reason="eos")
    return Tree(tree_id=tree_id, prompt_id="p", policy_version=0, nodes=[node], leaves=["1-0"])


@pytest.fixture
def client(redis_url):
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def make_stream(redis_url, key_prefix):
    streams: list[TreeStream] = []

    def make(consumer: str = "c1", **kwargs) -> TreeStream:
        kwargs.setdefault("block_ms", 10)
        stream = TreeStream(redis_url, "g", consumer, key_prefix, **kwargs)
        stream.ensure_group(start="0")  # these tests publish first, then read
        streams.append(stream)
        return stream

    yield make
    for stream in streams:
        stream.close()


def _publish(client, prefix: str, *tree_ids: str) -> list[str]:
    return [
        client.xadd(trees_stream(prefix), {TREE_FIELD: _tree(t).model_dump_json()}).decode() for t in tree_ids
    ]


class TestTreeStream:
    def test_ensure_group_is_idempotent_and_creates_the_stream(self, make_stream, client, key_prefix):
        stream = make_stream()
        stream.ensure_group()
        assert client.exists(trees_stream(key_prefix))
        assert stream.pending() == 0

    def test_a_new_group_reads_only_new_trees_unless_asked_for_the_history(
        self, redis_url, client, key_prefix
    ):
        _publish(client, key_prefix, "old")
        fresh = TreeStream(redis_url, "fresh", "c", key_prefix, block_ms=10)
        fresh.ensure_group()
        history = TreeStream(redis_url, "history", "c", key_prefix, block_ms=10)
        history.ensure_group(start="0")
        _publish(client, key_prefix, "new")
        assert [s.tree.tree_id for s in fresh.read(5)] == ["new"]
        assert [s.tree.tree_id for s in history.read(5)] == ["old", "new"]

    def test_read_then_ack(self, make_stream, client, key_prefix):
        ids = _publish(client, key_prefix, "a", "b", "c")
        stream = make_stream()
        got = stream.read(2) + stream.read(5)
        assert [s.tree.tree_id for s in got] == ["a", "b", "c"]
        assert [s.entry_id for s in got] == ids
        assert not any(s.is_claimed for s in got)
        assert stream.pending() == 3
        assert stream.ack(ids[:2]) == 2
        assert stream.pending() == 1
        assert stream.lag() == 0

    def test_empty_stream_blocks_then_returns_nothing(self, make_stream):
        stream = make_stream(block_ms=100)
        started = time.perf_counter()
        assert stream.read(3) == []
        assert time.perf_counter() - started >= 0.09

    def test_dead_consumers_entries_are_claimed(self, make_stream, client, key_prefix):
        _publish(client, key_prefix, "a", "b", "c")
        dead = make_stream("dead")
        assert len(dead.read(2)) == 2  # then it dies without acking
        alive = make_stream("alive", claim_idle_ms=50)
        time.sleep(0.1)
        got = alive.read(3)
        assert sorted(s.tree.tree_id for s in got) == ["a", "b", "c"]
        assert {s.tree.tree_id for s in got if s.is_claimed} == {"a", "b"}
        alive.ack(s.entry_id for s in got)
        assert alive.pending() == 0

    def test_own_in_flight_entries_are_not_handed_out_twice(self, make_stream, client, key_prefix):
        _publish(client, key_prefix, "a", "b")
        stream = make_stream(claim_idle_ms=20)
        first = stream.read(2)
        time.sleep(0.05)  # a long training step: the entries look idle
        assert stream.read(2) == []
        stream.ack([first[0].entry_id])
        assert stream.pending() == 1

    def test_restart_rereads_own_pending_in_pages(self, make_stream, client, key_prefix):
        _publish(client, key_prefix, "a", "b", "c", "d")
        assert len(make_stream("c1").read(3)) == 3  # crashes holding a, b, c
        restarted = make_stream("c1")
        pages = [restarted.read(2), restarted.read(2), restarted.read(2)]
        assert [[s.tree.tree_id for s in page] for page in pages] == [["a", "b"], ["c", "d"], []]
        assert [s.is_claimed for s in pages[1]] == [True, False]

    def test_corrupt_entries_go_to_failures_and_are_acked(self, make_stream, client, key_prefix):
        stream_key = trees_stream(key_prefix)
        bad = [
            client.xadd(stream_key, {TREE_FIELD: b"\xff{not json"}).decode(),
            client.xadd(stream_key, {TREE_FIELD: json.dumps({"tree_id": "x"})}).decode(),
            client.xadd(stream_key, {"something": "else"}).decode(),
        ]
        _publish(client, key_prefix, "good")
        stream = make_stream()
        got = stream.read(10)
        assert [s.tree.tree_id for s in got] == ["good"]
        assert stream.num_corrupt == 3
        assert stream.pending() == 1  # only the good one awaits its ack
        records = [
            json.loads(fields[FAILURE_FIELD.encode()])
            for _, fields in client.xrange(failures_stream(key_prefix))
        ]
        assert [r["entry_id"] for r in records] == bad
        assert {r["reason"] for r in records} == {"corrupt_tree_entry"}
        assert "no 'tree' field" in records[2]["error"]

    def test_entry_deleted_while_pending_is_dropped(self, make_stream, client, key_prefix):
        ids = _publish(client, key_prefix, "a", "b")
        make_stream("c1").read(2)
        client.xdel(trees_stream(key_prefix), ids[0])
        restarted = make_stream("c1")
        assert [s.tree.tree_id for s in restarted.read(5)] == ["b"]
        assert restarted.pending() == 1

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [({"block_ms": -1}, "block_ms"), ({"claim_idle_ms": 0}, "claim_idle_ms")],
    )
    def test_bad_settings(self, redis_url, key_prefix, kwargs, message):
        with pytest.raises(ValueError, match=message):
            TreeStream(redis_url, "g", "c", key_prefix, **kwargs)

    def test_bad_count(self, make_stream):
        with pytest.raises(ValueError, match="count must be >= 1"):
            make_stream().read(0)
