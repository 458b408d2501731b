"""Redis down: 503 + Retry-After (never 500), inline trees still answered, queue jobs retry until Redis is
back; a private redis-server per test, killed and restarted from its AOF."""

from __future__ import annotations

import json
import time

from api_helpers import SMALL_TREE, factory_of

from treepo.client import constants as names
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import printable_script


def _body(delivery: str, num_prompts: int = 2) -> dict:
    prompts = [{"text": f"{i}*2="} for i in range(num_prompts)]
    return {"prompts": prompts, "tree": SMALL_TREE, "sampling": {"seed": 9}, "delivery": delivery}


def test_redis_down_is_503_with_retry_after_and_inline_trees_are_still_answered(
    make_service, private_redis
) -> None:
    service = make_service(redis_url=private_redis.url)
    private_redis.kill()
    with service.client() as http:
        queued = http.post("/rollout_tree", json=_body("queue"))
        keyed = http.post("/rollout_tree", json=_body("inline"), headers={"Idempotency-Key": "k"})
        inline = http.post("/rollout_tree", json=_body("inline"))
        stream = http.post("/rollout_tree", json=_body("stream"))
        tree = http.get("/trees/some-id")
        ready = http.get("/readyz")
        metrics = http.get("/metrics")
    for refused in (queued, keyed, tree):
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1" and "Redis" in refused.json()["detail"]
    assert inline.status_code == 200 and len(inline.json()["trees"]) == 2
    assert stream.status_code == 200 and len(stream.text.splitlines()) == 2
    assert ready.status_code == 503 and ready.json()["redis"] == "unreachable"
    assert metrics.status_code == 200
    assert 'treepo_rejected_requests_total{reason="redis_unavailable"} 3.0' in metrics.text


def test_queue_job_waits_out_a_redis_restart(make_service, private_redis) -> None:
    slow = factory_of(lambda: ScriptedEngine(printable_script(eos_probability=0.0), latency_s=0.3))
    service = make_service(engine_factory=slow, redis_url=private_redis.url, redis_retry_window_s=30.0)
    with service.client() as http:
        accepted = http.post("/rollout_tree", json=_body("queue", 3)).json()
    private_redis.kill()  # before the first tree is done: its publish meets a dead Redis
    time.sleep(1.5)  # the outage
    private_redis.start()  # same port and directory: the AOF brings the job back
    import redis

    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    stream = names.trees_stream(service.settings.key_prefix)
    deadline = time.monotonic() + 30
    while client.xlen(stream) < 3:
        assert time.monotonic() < deadline, f"{client.xlen(stream)} of 3 trees after the restart"
        time.sleep(0.05)
    ids = [json.loads(fields[names.TREE_FIELD])["tree_id"] for _, fields in client.xrange(stream)]
    assert sorted(ids) == sorted(accepted["tree_ids"])
    assert client.xlen(names.failures_stream(service.settings.key_prefix)) == 0
    client.close()


def test_a_job_whose_retry_window_ran_out_is_resumed_once_redis_is_back(make_service, private_redis) -> None:
    slow = factory_of(lambda: ScriptedEngine(printable_script(eos_probability=0.0), latency_s=0.3))
    service = make_service(
        engine_factory=slow, redis_url=private_redis.url, redis_retry_window_s=0.2, job_lease_s=1.0
    )
    with service.client() as http:
        accepted = http.post("/rollout_tree", json=_body("queue", 3)).json()
    private_redis.kill()
    time.sleep(3.0)  # longer than the retry window: the job gives up and leaves itself to recovery
    private_redis.start()
    import redis

    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    prefix = service.settings.key_prefix
    stream, failures = names.trees_stream(prefix), names.failures_stream(prefix)
    deadline = time.monotonic() + 30
    while client.xlen(stream) + client.xlen(failures) < 3 or client.zcard(f"{prefix}:jobs:leases"):
        assert time.monotonic() < deadline, f"{client.xlen(stream)} of 3 trees after the restart"
        time.sleep(0.05)
    ids = [json.loads(fields[names.TREE_FIELD])["tree_id"] for _, fields in client.xrange(stream)]
    assert sorted(ids) == sorted(accepted["tree_ids"]), "re-sampled by recovery, each once"
    client.close()
