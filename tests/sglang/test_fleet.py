"""Two `treepo serve` replicas (one Redis prefix) over the same two real SGLang workers: one fleet. Trees through
both, a weight push through one that both workers and both replicas then serve, every node stamped with a
version the fleet served, and a worker killed mid-run whose paths re-run on the other."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import httpx
import pytest
from sglang_helpers import Service
from test_service import write_weights

TREE = {"width": 4, "branch": 2, "segment_tokens": 6, "max_depth": 3}
pytestmark = pytest.mark.timeout(
    900
)  # starts two SGLang servers and two replicas (minutes on a busy 2-core VM)


def weight_version(url: str) -> str:
    return httpx.get(url + "/get_model_info", timeout=30).json()["weight_version"]


def wait_for(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def running(url: str) -> float:
    """sglang:num_running_reqs of a worker (the servers run with --enable-metrics)."""
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("sglang:num_running_reqs"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rollout(service: Service, prompts: int, seed: int) -> list[dict]:
    body = {
        "prompts": [{"text": f"What is {a}+{a * 7 % 50}? "} for a in range(seed, seed + prompts)],
        "tree": TREE,
        "sampling": {"temperature": 1.0},
    }
    response = service.http.post("/rollout_tree", json=body)
    assert response.status_code == 200, response.text
    return response.json()["trees"]


def in_thread(work, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(work(*args)), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture(scope="module")
def victim(launch):
    """The worker this module kills (the session's shared one survives)."""
    return launch()


@pytest.fixture(scope="module")
def replicas(sglang, victim, tmp_path_factory, redis_url_session):
    workdir = tmp_path_factory.mktemp("fleet")  # one weights directory, as on a shared volume
    env = {"TREEPO_KEY_PREFIX": f"treepo-fleet-{uuid.uuid4().hex[:10]}", "TREEPO_FLEET_POLL_S": "0.2"}
    services = [Service([sglang.url, victim.url], workdir, redis_url_session, **env) for _ in range(2)]
    for service in services:
        service.wait_ready()
    yield services
    for service in services:
        service.stop()


def test_two_replicas_two_workers_push_and_a_killed_worker(replicas, sglang, victim, model_path) -> None:
    a, b = replicas
    old = a.http.get("/weights").json()["policy_version"]
    assert b.http.get("/weights").json()["policy_version"] == old
    new = old + 1
    changed = write_weights(a, model_path, "fleet-step.safetensors", 1.5)

    # trees through both replicas while a push goes through A
    runs = [in_thread(rollout, service, 4, seed) for service, seed in ((a, 10), (b, 20))]
    pushed = a.http.post("/weights", json={"path": changed, "version": new})
    assert pushed.status_code == 200, pushed.text
    for thread, _ in runs:
        thread.join()
    trees = [tree for _, result in runs for tree in result[0]]
    assert weight_version(sglang.url) == weight_version(victim.url) == str(new)
    wait_for(lambda: b.http.get("/weights").json()["policy_version"] == new, "B to adopt the push", 30)
    assert b.http.get("/readyz").json()["policy_version"] == new
    trees += rollout(a, 2, 30) + rollout(b, 2, 40)
    for tree in trees:
        assert {node["policy_version"] for node in tree["nodes"]} <= {old, new}
    assert all(node["policy_version"] == new for tree in trees[-4:] for node in tree["nodes"])

    # the victim dies while B's trees run on both workers: its paths re-run on the survivor
    thread, result = in_thread(rollout, b, 8, 50)
    wait_for(lambda: running(victim.url) > 0 or not thread.is_alive(), "requests on the victim", 120)
    assert thread.is_alive(), "the rollout ended before the victim was killed: make it longer"
    os.killpg(victim.process.pid, signal.SIGKILL)
    victim.process.wait()
    thread.join()
    (survived,) = result
    assert len(survived) == 8
    for tree in survived:
        assert len(tree["leaves"]) == TREE["width"]
        assert {node["policy_version"] for node in tree["nodes"]} == {new}
    for service in (a, b):  # still ready, degraded: a worker is gone, trees run on the other
        ready = service.http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["engine"] == "degraded", ready.text
        assert ready.json()["workers_down"] == [victim.url]
    assert all(len(tree["leaves"]) == TREE["width"] for tree in rollout(a, 2, 60))
