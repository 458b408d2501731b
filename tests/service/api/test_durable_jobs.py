"""Durable queue jobs and enforced backpressure: recorded before the 202, resumed after a stop, each tree
published once, admission atomic, pending idempotency keys recovered; real HTTP + Redis."""

from __future__ import annotations

import hashlib
import threading
import time

import httpx
from api_helpers import SMALL_TREE, Service, factory_of

from treepo.client import constants as names
from treepo.client.schema import RolloutTreeRequest
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import printable_script
from treepo.service.jobstore import JobStore
from treepo.service.queue import IdempotencyRecord

STUCK = factory_of(lambda: ScriptedEngine(printable_script(eos_probability=0.0), latency_s=30.0))


def _body(num_prompts: int = 3, delivery: str = "queue") -> dict:
    prompts = [{"text": f"{i}+1="} for i in range(num_prompts)]
    return {"prompts": prompts, "tree": SMALL_TREE, "sampling": {"seed": 5}, "delivery": delivery}


def _wait(condition, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _published(service: Service) -> list[str]:
    """Tree ids in the trees and failures streams, in stream order (duplicates kept)."""
    import json

    prefix = service.settings.key_prefix
    trees = service.redis.xrange(names.trees_stream(prefix))
    failures = service.redis.xrange(names.failures_stream(prefix))
    ids = [json.loads(f[names.TREE_FIELD])["tree_id"] for _, f in trees]
    return ids + [json.loads(f[names.FAILURE_FIELD])["tree_id"] for _, f in failures]


def test_job_is_in_redis_before_the_202_and_resumed_by_the_next_service(make_service) -> None:
    stuck = make_service(engine_factory=STUCK, shutdown_grace_s=0.2, job_lease_s=60.0)
    with stuck.client() as http:
        accepted = http.post("/rollout_tree", json=_body()).json()
    store = stuck.app.state.jobs.store
    assert stuck.redis.smembers(store.todo_key(accepted["request_id"])) == set(accepted["tree_ids"])
    stuck.server.stop()  # the grace runs out: the job is given up, not failed
    assert _published(stuck) == []
    assert stuck.redis.zscore(store.leases_key, accepted["request_id"]) == 0

    fresh = make_service(job_lease_s=1.0)  # same Redis and prefix: a restart or another replica
    _wait(lambda: len(_published(fresh)) >= 3, "the resumed trees")
    time.sleep(0.3)  # nothing else may arrive
    ids = _published(fresh)
    assert sorted(ids) == sorted(accepted["tree_ids"]), "each accepted tree exactly once"
    assert not fresh.redis.exists(
        store.todo_key(accepted["request_id"]), store.job_key(accepted["request_id"])
    )
    assert fresh.redis.hlen(store.reserved_key) == 0
    with fresh.client() as http:
        metrics = http.get("/metrics").text
    assert (
        "treepo_queue_jobs_resumed_total 1.0" in metrics and "treepo_queue_trees_resumed_total 3.0" in metrics
    )


def test_publish_is_at_most_once_per_tree_id(service: Service, key_prefix: str) -> None:
    store: JobStore = service.app.state.jobs.store
    stream = names.trees_stream(key_prefix)

    async def run() -> tuple[bool, bool, bool]:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(service.settings.redis_url, decode_responses=True)
        own = JobStore(client, key_prefix, lease_s=5, job_ttl_s=60)
        admitted = await own.admit(
            "job-1", {}, ["t1", "t2"], max_depth=10, groups=["trainer"], idempotency=None
        )
        first = await own.publish("job-1", "t1", stream, names.TREE_FIELD, '{"tree_id": "t1"}', 0)
        again = await own.publish("job-1", "t1", stream, names.TREE_FIELD, '{"tree_id": "t1"}', 0)
        await client.aclose()
        return admitted.accepted, first, again

    import asyncio

    accepted, first, again = asyncio.run(run())
    assert accepted and first and not again
    assert service.redis.xlen(stream) == 1
    assert service.redis.hget(store.reserved_key, "job-1") == "1"  # t2 still reserved


def test_admission_is_atomic_under_concurrency(make_service) -> None:
    """5 concurrent requests of one prompt under a limit of 2: exactly 2 accepted, 3 refused with 429."""
    service = make_service(engine_factory=STUCK, max_queue_depth=2, shutdown_grace_s=0.2)
    barrier = threading.Barrier(5)
    statuses: list[int] = []

    def post() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as http:
            barrier.wait()
            statuses.append(http.post("/rollout_tree", json=_body(1)).status_code)

    threads = [threading.Thread(target=post) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [202, 202, 429, 429, 429]


def test_queue_depth_counts_the_training_group_only(make_service) -> None:
    service = make_service(max_queue_depth=2)
    stream = names.trees_stream(service.settings.key_prefix)
    for i in range(2):
        service.redis.xadd(stream, {names.TREE_FIELD: f'{{"old": {i}}}'})
    service.redis.xgroup_create(stream, "dashboard", id="0")  # never reads
    service.redis.xgroup_create(stream, names.DEFAULT_GROUP, id="$")  # the trainer consumed everything
    with service.client() as http:
        answer = http.post("/rollout_tree", json=_body(2))
    assert answer.status_code == 202, answer.text


def test_replay_reports_the_jobs_real_state(make_service) -> None:
    headers = {"Idempotency-Key": "job-state"}
    stuck = make_service(engine_factory=STUCK, shutdown_grace_s=0.2)
    with stuck.client() as http:
        first = http.post("/rollout_tree", json=_body(), headers=headers)
        replay = http.post("/rollout_tree", json=_body(), headers=headers)
    assert first.status_code == replay.status_code == 202
    assert replay.json() == first.json() and replay.headers["Job-Remaining-Trees"] == "3"
    stuck.server.stop()

    fresh = make_service(job_lease_s=1.0)
    _wait(lambda: len(_published(fresh)) == 3, "the resumed trees")
    with fresh.client() as http:
        done = http.post("/rollout_tree", json=_body(), headers=headers)
    assert done.status_code == 202 and done.json() == first.json()
    assert done.headers["Job-Remaining-Trees"] == "0"
    assert len(_published(fresh)) == 3


def test_pending_key_of_a_dead_owner_is_recovered(make_service) -> None:
    service = make_service(idempotency_lease_s=1)
    body = _body(1, delivery="inline")
    fingerprint = hashlib.sha256(
        RolloutTreeRequest.model_validate(body).model_dump_json().encode()
    ).hexdigest()
    key = names.idempotency_key("orphan", service.settings.key_prefix)
    # what a process that died mid-request leaves behind
    service.redis.set(key, IdempotencyRecord(fingerprint, False).to_json(), ex=1)
    with service.client() as http:
        busy = http.post("/rollout_tree", json=body, headers={"Idempotency-Key": "orphan"})
        assert busy.status_code == 409 and busy.headers["Retry-After"] == "1"
        _wait(lambda: not service.redis.exists(key), "the orphaned key to lapse", timeout_s=5)
        ran = http.post("/rollout_tree", json=body, headers={"Idempotency-Key": "orphan"})
    assert ran.status_code == 200 and len(ran.json()["trees"]) == 1


def test_a_live_owner_keeps_its_key_past_the_lease(make_service) -> None:
    slow = factory_of(lambda: ScriptedEngine(printable_script(eos_probability=0.0), latency_s=1.5))
    service = make_service(engine_factory=slow, idempotency_lease_s=1, job_lease_s=1.0)
    headers = {"Idempotency-Key": "long-inline"}
    results: list[httpx.Response] = []

    def first() -> None:
        with service.client() as http:
            results.append(http.post("/rollout_tree", json=_body(1, "inline"), headers=headers))

    thread = threading.Thread(target=first)
    thread.start()
    time.sleep(2.5)  # well past the 1 s lease: only renewal keeps the key
    with service.client() as http:
        busy = http.post("/rollout_tree", json=_body(1, "inline"), headers=headers)
        thread.join()
        replay = http.post("/rollout_tree", json=_body(1, "inline"), headers=headers)
    assert results[0].status_code == 200
    assert busy.status_code == 409, "the running request's key was taken over"
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.json() == results[0].json()


def test_an_unreadable_job_record_becomes_failure_records(make_service, key_prefix: str) -> None:
    """A job another version wrote (or a corrupt record) is not retried for ever: its trees are failed."""
    service = make_service(job_lease_s=1.0)
    import asyncio
    import json

    import redis.asyncio as aioredis

    async def admit() -> None:
        client = aioredis.Redis.from_url(service.settings.redis_url, decode_responses=True)
        store = JobStore(client, key_prefix, lease_s=5, job_ttl_s=60)
        record = {"request": {"prompts": "not a list"}, "prompts": []}
        await store.admit("old-job", record, ["t1", "t2"], max_depth=10, groups=[], idempotency=None)
        await store.release("old-job")  # its owner is gone
        await client.aclose()

    asyncio.run(admit())
    _wait(lambda: sorted(_published(service)) == ["t1", "t2"], "the failure records")
    failures = service.redis.xrange(names.failures_stream(key_prefix))
    assert all("unreadable job record" in json.loads(f[names.FAILURE_FIELD])["error"] for _, f in failures)
    assert service.redis.zcard(service.app.state.jobs.store.leases_key) == 0


def test_renewal_extends_pending_keys_only(service: Service, key_prefix: str) -> None:
    import asyncio

    queue = service.app.state.queue
    pending = names.idempotency_key("running", key_prefix)
    done = names.idempotency_key("finished", key_prefix)
    service.redis.set(pending, IdempotencyRecord("f", False).to_json(), ex=5)
    service.redis.set(done, IdempotencyRecord("f", True, 200).to_json(), ex=3600)

    async def hold() -> None:
        import redis.asyncio as aioredis

        from treepo.service.queue import TreeQueue

        client = aioredis.Redis.from_url(service.settings.redis_url, decode_responses=True)
        await TreeQueue(client, key_prefix, queue.retention, []).hold({"running", "finished"})
        await client.aclose()

    asyncio.run(hold())
    assert 5 < service.redis.ttl(pending) <= queue.retention.pending_lease_s
    assert service.redis.ttl(done) > 3000, "a finished record keeps its TTL"


def test_a_dropped_stream_frees_its_key(make_service) -> None:
    slow = factory_of(lambda: ScriptedEngine(printable_script(eos_probability=0.0), latency_s=0.5))
    service = make_service(engine_factory=slow, idempotency_lease_s=1, job_lease_s=1.0)
    headers = {"Idempotency-Key": "dropped-stream"}
    key = names.idempotency_key("dropped-stream", service.settings.key_prefix)
    with (
        service.client() as http,
        http.stream("POST", "/rollout_tree", json=_body(1, "stream"), headers=headers),
    ):
        _wait(lambda: service.redis.exists(key), "the stream's key")
    # the client hung up before any tree: the key is released (or lapses), never held for ever
    _wait(lambda: not service.redis.exists(key), "the dropped stream's key to be freed", timeout_s=10)
    _wait(lambda: not service.app.state.jobs.held_keys, "the key to be let go")
    with service.client() as http:
        again = http.post("/rollout_tree", json=_body(1, "stream"), headers=headers)
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
