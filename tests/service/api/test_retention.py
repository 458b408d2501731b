"""Bounded Redis: the trees stream is trimmed below what every training group acknowledged (never what one
has not), failure records age out, queue depth survives an unknown lag, `treepo_redis_*` gauges; real Redis."""

from __future__ import annotations

import asyncio
import json
import time

import redis
import redis.asyncio as aioredis
from api_helpers import SMALL_TREE, Service

from treepo.client import constants as names
from treepo.service.metrics import ServiceMetrics
from treepo.service.retention import Housekeeper


def _trim(redis_url: str, prefix: str, groups: list[str], failures_retention_s: float = 3600) -> tuple:
    async def run() -> tuple[int, int]:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        keeper = Housekeeper(
            client, prefix, groups, ServiceMetrics(), failures_retention_s=failures_retention_s
        )
        try:
            return await keeper.trim()
        finally:
            await client.aclose()

    return asyncio.run(run())


def _fill(client: redis.Redis, stream: str, count: int) -> list[str]:
    return [client.xadd(stream, {names.TREE_FIELD: f'{{"n": {i}}}'}) for i in range(count)]


def test_trims_only_what_every_training_group_acknowledged(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = names.trees_stream(key_prefix)
    ids = _fill(client, stream, 6)
    assert _trim(redis_url, key_prefix, ["trainer"]) == (0, 0), "no group has read anything yet"
    client.xgroup_create(stream, "trainer", id="0")
    client.xgroup_create(stream, "dashboard", id="0")  # never reads: must not hold trimming back
    client.xreadgroup("trainer", "c1", {stream: ">"}, count=4)
    client.xack(stream, "trainer", ids[0], ids[1], ids[3])  # ids[2] still pending
    assert _trim(redis_url, key_prefix, ["trainer"])[0] == 2
    assert [entry_id for entry_id, _ in client.xrange(stream)] == ids[2:]
    client.xack(stream, "trainer", ids[2])
    assert _trim(redis_url, key_prefix, ["trainer"])[0] == 2
    assert [entry_id for entry_id, _ in client.xrange(stream)] == ids[4:], "unread trees are kept"
    client.close()


def test_without_the_configured_group_every_group_counts(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = names.trees_stream(key_prefix)
    ids = _fill(client, stream, 3)
    client.xgroup_create(stream, "demo", id="0")
    client.xreadgroup("demo", "c1", {stream: ">"}, count=1)
    client.xack(stream, "demo", ids[0])
    assert _trim(redis_url, key_prefix, ["trainer"])[0] == 1
    assert client.xlen(stream) == 2
    client.close()


def test_failure_records_age_out(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    failures = names.failures_stream(key_prefix)
    client.xadd(failures, {names.FAILURE_FIELD: "{}"}, id=f"{int((time.time() - 7200) * 1000)}-0")
    client.xadd(failures, {names.FAILURE_FIELD: "{}"})
    assert _trim(redis_url, key_prefix, ["trainer"], failures_retention_s=3600) == (0, 1)
    assert client.xlen(failures) == 1
    client.close()


def _trimmed_to(service: Service, stream: str, length: int) -> None:
    deadline = time.monotonic() + 10
    while service.redis.xlen(stream) > length:
        assert time.monotonic() < deadline, "the service never trimmed the acknowledged trees"
        time.sleep(0.02)


def test_depth_when_redis_cannot_tell_the_lag(make_service) -> None:
    """After a deletion past a group's last delivery Redis reports lag nil: the (trimmed) stream length,
    2, is the backlog; 2 + 1 fits the limit of 3."""
    service = make_service(max_queue_depth=3, trim_interval_s=0.05)
    stream = names.trees_stream(service.settings.key_prefix)
    ids = _fill(service.redis, stream, 4)
    service.redis.xgroup_create(stream, names.DEFAULT_GROUP, id="0")
    service.redis.xreadgroup(names.DEFAULT_GROUP, "c1", {stream: ">"}, count=1)
    service.redis.xack(stream, names.DEFAULT_GROUP, ids[0])
    service.redis.xdel(stream, ids[2])
    assert service.redis.xinfo_groups(stream)[0]["lag"] is None
    _trimmed_to(service, stream, 2)
    with service.client() as http:
        answer = http.post("/rollout_tree", json={**_inline_body("queue"), "prompts": [{"text": "1+1="}]})
    assert answer.status_code == 202, answer.text


def test_depth_when_redis_reports_a_lag_too_high(make_service) -> None:
    """After an AOF reload Redis can count a group's entries-read from 0 again (its lag then reads too high):
    the backlog is never more than the stream holds."""
    service = make_service(max_queue_depth=3, trim_interval_s=0.05)
    stream = names.trees_stream(service.settings.key_prefix)
    ids = _fill(service.redis, stream, 4)
    service.redis.xgroup_create(stream, names.DEFAULT_GROUP, id="0")
    service.redis.xreadgroup(names.DEFAULT_GROUP, "c1", {stream: ">"}, count=2)
    service.redis.xack(stream, names.DEFAULT_GROUP, *ids[:2])
    _trimmed_to(service, stream, 2)
    service.redis.execute_command("XGROUP", "SETID", stream, names.DEFAULT_GROUP, ids[1], "ENTRIESREAD", 0)
    assert service.redis.xinfo_groups(stream)[0]["lag"] == 4
    with service.client() as http:
        answer = http.post("/rollout_tree", json={**_inline_body("queue"), "prompts": [{"text": "1+1="}]})
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 20
        while service.redis.xlen(stream) < 3:  # the new tree is published
            assert time.monotonic() < deadline, "the tree never arrived"
            time.sleep(0.02)
        metrics = http.get("/metrics").text
    depth = next(line for line in metrics.splitlines() if line.startswith("treepo_queue_depth_trees "))
    assert depth == "treepo_queue_depth_trees 3.0"  # 2 unread + 1 new, never 4 + 1


def test_redis_gauges_on_metrics(service: Service) -> None:
    body = {"prompts": [{"text": "1+1="}, {"text": "2+2="}], "tree": SMALL_TREE, "delivery": "queue"}
    stream = names.trees_stream(service.settings.key_prefix)
    with service.client() as http:
        assert http.post("/rollout_tree", json=body).status_code == 202
        deadline = time.monotonic() + 20
        while service.redis.xlen(stream) < 2:
            assert time.monotonic() < deadline, "trees missing"
            time.sleep(0.05)
        text = http.get("/metrics").text
    assert 'treepo_redis_stream_length_entries{stream="trees"} 2.0' in text
    assert 'treepo_redis_stream_length_entries{stream="failures"} 0.0' in text
    memory = next(line for line in text.splitlines() if line.startswith("treepo_redis_memory_bytes "))
    assert float(memory.split()[1]) > 0
    assert 'treepo_redis_trimmed_entries_total{stream="trees"}' in text


def _inline_body(delivery: str = "inline") -> dict:
    prompts = [{"text": "1+1="}, {"text": "5-2="}]
    return {"prompts": prompts, "tree": SMALL_TREE, "sampling": {"seed": 1}, "delivery": delivery}


def test_an_inline_answer_is_kept_once_and_replayed_from_the_tree_copies(service: Service) -> None:
    headers = {"Idempotency-Key": "once"}
    prefix = service.settings.key_prefix
    with service.client() as http:
        first = http.post("/rollout_tree", json=_inline_body(), headers=headers)
        record = json.loads(service.redis.get(names.idempotency_key("once", prefix)))
        tree_ids = [tree["tree_id"] for tree in first.json()["trees"]]
        assert record["body"] == "" and record["trees"] == tree_ids, "the trees are stored once"
        again = http.post("/rollout_tree", json=_inline_body(), headers=headers)
        assert again.status_code == 200 and again.content == first.content
        service.redis.delete(names.tree_key(tree_ids[1], prefix))  # its TTL ran out
        expired = http.post("/rollout_tree", json=_inline_body(), headers=headers)
    assert expired.status_code == 410 and "expired" in expired.json()["detail"]


def test_a_streamed_answer_is_replayed_from_the_tree_copies(service: Service) -> None:
    headers = {"Idempotency-Key": "streamed"}
    with service.client() as http:
        first = http.post("/rollout_tree", json=_inline_body("stream"), headers=headers)
        record = json.loads(service.redis.get(names.idempotency_key("streamed", service.settings.key_prefix)))
        again = http.post("/rollout_tree", json=_inline_body("stream"), headers=headers)
    assert record["body"] == "" and len(record["trees"]) == 2
    assert again.headers["Idempotent-Replayed"] == "true"
    assert sorted(again.text.splitlines()) == sorted(first.text.splitlines())


def test_answers_over_the_byte_budget_are_not_kept(make_service) -> None:
    service = make_service(max_copy_bytes=100)
    headers = {"Idempotency-Key": "huge"}
    with service.client() as http:
        first = http.post("/rollout_tree", json=_inline_body(), headers=headers)
        tree_id = first.json()["trees"][0]["tree_id"]
        copy = http.get(f"/trees/{tree_id}")
        again = http.post("/rollout_tree", json=_inline_body(), headers=headers)
    assert first.status_code == 200 and copy.status_code == 404
    assert again.status_code == 410 and "too large" in again.json()["detail"]
    assert len(service.redis.get(names.idempotency_key("huge", service.settings.key_prefix))) < 300


def test_the_service_trims_what_the_trainer_acknowledged(make_service) -> None:
    service = make_service(trim_interval_s=0.1)
    stream = names.trees_stream(service.settings.key_prefix)
    service.redis.xgroup_create(stream, names.DEFAULT_GROUP, id="$", mkstream=True)
    with service.client() as http:
        assert http.post("/rollout_tree", json=_inline_body("queue")).status_code == 202
    deadline = time.monotonic() + 20
    acked = 0
    while acked < 2:  # a trainer: read, ack
        assert time.monotonic() < deadline, "trees missing"
        read = service.redis.xreadgroup(names.DEFAULT_GROUP, "t1", {stream: ">"}, count=10, block=100)
        ids = [entry_id for _, entries in read for entry_id, _ in entries]
        acked += service.redis.xack(stream, names.DEFAULT_GROUP, *ids) if ids else 0
    while service.redis.xlen(stream):
        assert time.monotonic() < deadline, "acknowledged trees were never trimmed"
        time.sleep(0.05)
