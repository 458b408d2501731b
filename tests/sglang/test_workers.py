"""Two real SGLang workers behind one service: prefix-affine routing, pushes to both, a failing worker, and a
worker restarted under the service (noticed, current weights re-pushed, readiness honest throughout)."""

from __future__ import annotations

import time

import httpx
import pytest
from sglang_helpers import Service
from test_service import greedy, write_weights


def weight_version(url: str) -> str:
    return httpx.get(url + "/get_model_info", timeout=30).json()["weight_version"]


def requests_served(url: str) -> float:
    """sglang:num_requests_total of a worker (the servers run with --enable-metrics)."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("sglang:num_requests_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(condition, what: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def second(launch):
    return launch()


@pytest.fixture(scope="module")
def service(sglang, second, tmp_path_factory, redis_url_session):
    service = Service([sglang.url, second.url], tmp_path_factory.mktemp("serve2"), redis_url_session)
    service.wait_ready()
    yield service
    service.stop()


def test_trees_spread_over_both_workers_each_on_one(service, sglang, second) -> None:
    before = [requests_served(sglang.url), requests_served(second.url)]
    prompts = [{"text": f"What is {a}+{a + 3}? "} for a in range(10, 18)]
    body = {"prompts": prompts, "tree": {"width": 4, "branch": 2, "segment_tokens": 4, "max_depth": 2}}
    response = service.http.post("/rollout_tree", json=body)
    assert response.status_code == 200, response.text
    served = [requests_served(sglang.url) - before[0], requests_served(second.url) - before[1]]
    assert all(count > 0 for count in served), served
    for tree in response.json()["trees"]:  # a tree stays where its KV is: its children hit the cache
        assert tree["stats"]["cached_tokens"] > 0


def test_push_reaches_both_then_a_failing_worker_then_a_restart(
    service, sglang, second, launch, model_path
) -> None:
    texts = [f"What is {a}*3? " for a in range(2, 10)]  # routed to both workers
    version = service.http.get("/weights").json()["policy_version"]
    baseline = [greedy(service, text)["nodes"][0]["token_ids"] for text in texts]
    changed = write_weights(service, model_path, "w-perturbed.safetensors", 0.2)
    pushed = service.http.post("/weights", json={"path": changed, "version": version + 1})
    assert pushed.status_code == 200, pushed.text
    assert weight_version(sglang.url) == weight_version(second.url) == str(version + 1)
    expected = [greedy(service, text)["nodes"][0]["token_ids"] for text in texts]
    assert expected != baseline

    second.stop()  # one worker fails: the push says which, readiness says so, the version stays
    failed = service.http.post("/weights", json={"path": changed, "version": version + 2})
    assert failed.status_code in (422, 503) and second.url in failed.text, failed.text
    assert service.http.get("/weights").json()["policy_version"] == version + 1
    assert service.http.get("/readyz").status_code == 503

    # SGLang comes back with its base weights, as "default": the service re-pushes version + 1 to it
    restarted = launch(port=int(second.url.rsplit(":", 1)[1]))
    wait_for(lambda: service.http.get("/readyz").status_code == 200, "readiness after the restart")
    assert weight_version(restarted.url) == weight_version(sglang.url) == str(version + 1)
    again = [greedy(service, text) for text in texts]  # on both workers: the pushed weights answer
    assert [tree["nodes"][0]["token_ids"] for tree in again] == expected
    assert {tree["policy_version"] for tree in again} == {version + 1}
