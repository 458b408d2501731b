"""Two replicas on one Redis prefix are one fleet: idempotency keys, backpressure, trees and the policy version
are shared; a push through one is adopted by the other; concurrent pushes never interleave."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from api_helpers import SMALL_TREE, Service, factory_of
from safetensors.numpy import save_file

from treepo.service.engine.protocol import GenerateOutput, GenerateRequest
from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import printable_script


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pair(make_service, **settings: Any) -> tuple[Service, Service]:
    """Replicas A and B: same Redis prefix, same weights directory, own ports and engines."""
    return make_service(port=_port(), **settings), make_service(port=_port(), **settings)


def _checkpoint(service: Service, name: str, value: float) -> str:
    save_file({"w": np.full((4, 3), value, dtype=np.float32)}, str(service.settings.weights_dir / name))
    return name


def _body(delivery: str = "inline", n: int = 1) -> dict:
    prompts = [{"text": f"{i}+1="} for i in range(n)]
    return {"prompts": prompts, "tree": SMALL_TREE, "sampling": {"seed": 5}, "delivery": delivery}


def _wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_idempotency_keys_and_trees_are_fleet_wide(make_service) -> None:
    a, b = _pair(make_service)
    headers = {"Idempotency-Key": "fleet-1"}
    with a.client() as http_a, b.client() as http_b:
        first = http_a.post("/rollout_tree", json=_body(), headers=headers)
        again = http_b.post("/rollout_tree", json=_body(), headers=headers)
        tree_id = first.json()["trees"][0]["tree_id"]
        kept = http_b.get(f"/trees/{tree_id}")
    assert first.status_code == again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == first.json()
    assert len(b.engine.requests) == 0  # B sampled nothing: it replayed A's answer
    assert kept.status_code == 200 and kept.json() == first.json()["trees"][0]


def test_backpressure_counts_both_replicas(make_service) -> None:
    a, b = _pair(make_service, max_queue_depth=2)
    with a.client() as http_a, b.client() as http_b:
        accepted = http_a.post("/rollout_tree", json=_body("queue", n=2))
        refused = http_b.post("/rollout_tree", json=_body("queue", n=1))
    assert accepted.status_code == 202, accepted.text
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", refused.text


def test_a_push_through_one_replica_is_served_by_the_other_and_a_late_one(make_service) -> None:
    a, b = _pair(make_service, fleet_poll_s=0.05)
    _checkpoint(a, "step-1.safetensors", 0.5)
    with a.client() as http_a, b.client() as http_b:
        pushed = http_a.post("/weights", json={"path": "step-1.safetensors", "version": 4})
        assert pushed.status_code == 200, pushed.text
        _wait_for(lambda: http_b.get("/weights").json()["policy_version"] == 4, "B to adopt version 4")
        shown = http_b.get("/weights").json()
        ready = http_b.get("/readyz").json()
        tree = http_b.post("/rollout_tree", json=_body()).json()["trees"][0]
        retried = http_b.post(
            "/weights", json={"path": "step-1.safetensors", "version": 4}
        )  # A's answer lost
    assert shown["path"] == "step-1.safetensors" and ready["policy_version"] == 4 and ready["fleet"] == "ok"
    assert b.engine.weights_path == str(
        a.settings.weights_dir.resolve() / "step-1.safetensors"
    )  # B loaded it
    assert tree["policy_version"] == 4 and {n["policy_version"] for n in tree["nodes"]} == {4}
    assert retried.status_code == 200 and retried.json()["policy_version"] == 4

    late = make_service(port=_port())  # starts after the push: serves the fleet's version when ready
    with late.client() as http:
        assert http.get("/readyz").json()["policy_version"] == 4
        assert http.post("/rollout_tree", json=_body()).json()["trees"][0]["policy_version"] == 4


class SlowLoad(ScriptedEngine):
    """A scripted engine whose weight loads take a while, so two pushes overlap."""

    def __init__(self) -> None:
        super().__init__(printable_script())
        self.loads: list[int] = []

    async def update_weights(self, path: str, version: int) -> None:
        self.loads.append(version)
        await asyncio.sleep(0.3)
        await super().update_weights(path, version)


def test_concurrent_pushes_to_two_replicas_one_wins_per_version(make_service) -> None:
    a, b = _pair(make_service, engine_factory=factory_of(SlowLoad))
    for version in (1, 2):  # different content per replica: the loser is not a retry of the winner
        _checkpoint(a, f"a-{version}.safetensors", version + 0.5)
        _checkpoint(a, f"b-{version}.safetensors", version + 0.25)
    answers: dict[tuple[str, int], httpx.Response] = {}

    def push(service: Service, name: str, version: int) -> None:
        with service.client() as http:
            answers[(name, version)] = http.post("/weights", json={"path": name, "version": version})

    for version in (1, 2):
        threads = [
            threading.Thread(target=push, args=(service, f"{side}-{version}.safetensors", version))
            for service, side in ((a, "a"), (b, "b"))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for version in (1, 2):
        codes = sorted(answers[(f"{side}-{version}.safetensors", version)].status_code for side in "ab")
        assert codes == [200, 409], answers
    losers = [r for r in answers.values() if r.status_code == 409]
    final = re.compile("already loaded with different weights|greater than the current policy_version")
    assert all(final.search(r.json()["detail"]) and "Retry-After" not in r.headers for r in losers), losers
    with a.client() as http_a, b.client() as http_b:
        shown = {http_a.get("/weights").json()["path"], http_b.get("/weights").json()["path"]}
    winner = next(name for (name, version), r in answers.items() if version == 2 and r.status_code == 200)
    assert shown == {winner}
    # each replica loaded each version at most once (its own push or the adoption before a losing push)
    assert all(sorted(set(s.engine.loads)) == sorted(s.engine.loads) for s in (a, b))


class SharedWorkers:
    """Stands for SGLang workers that every replica's engine talks to: loading weights there is shared."""

    def __init__(self) -> None:
        self.version = 0
        self.loads: list[tuple[str, int]] = []


class SharedEngine(ScriptedEngine):
    """A scripted engine over `SharedWorkers`: a replica adopts what another loaded (like SGLangEngine)."""

    def __init__(self, workers: SharedWorkers) -> None:
        super().__init__(printable_script())
        self.workers = workers

    async def update_weights(self, path: str, version: int) -> None:
        self.workers.loads.append((path, version))
        self.workers.version = version
        await super().update_weights(path, version)

    def adopt_weights(self, path: str, version: int) -> None:
        self._version = version

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        assert self.workers.version == self._version, "served a version the workers do not hold"
        return await super().generate(request)


def test_shared_workers_are_loaded_once_per_push(make_service) -> None:
    workers = SharedWorkers()
    a, b = _pair(make_service, engine_factory=factory_of(lambda: SharedEngine(workers)), fleet_poll_s=0.05)
    _checkpoint(a, "step-1.safetensors", 0.5)
    with a.client() as http_a, b.client() as http_b:
        assert http_b.post("/weights", json={"path": "step-1.safetensors"}).status_code == 200
        _wait_for(lambda: http_a.get("/weights").json()["policy_version"] == 1, "A to adopt version 1")
        tree = http_a.post("/rollout_tree", json=_body()).json()["trees"][0]
    assert len(workers.loads) == 1 and tree["policy_version"] == 1


def test_a_push_while_another_replica_holds_the_lock_gets_409_with_retry_after(make_service) -> None:
    service = make_service()
    fleet = service.app.state.weights_store.fleet
    fleet.lock_wait_s = 0.3
    _checkpoint(service, "step-1.safetensors", 0.5)
    service.redis.set(fleet.lock_key, "another-replica:push", px=60_000)
    with service.client() as http:
        busy = http.post("/weights", json={"path": "step-1.safetensors"})
        service.redis.delete(fleet.lock_key)  # that push ended
        done = http.post("/weights", json={"path": "step-1.safetensors"})
    assert busy.status_code == 409 and busy.headers["Retry-After"] == "1", busy.text
    assert "another replica has been pushing weights" in busy.json()["detail"]
    assert done.status_code == 200 and done.json()["policy_version"] == 1
    assert service.redis.hgetall(fleet.record_key)["version"] == "1"
    assert not service.redis.exists(fleet.lock_key)  # released


class FileLoad(ScriptedEngine):
    """A scripted engine whose weight loads read the file (a missing one fails, as a real load does)."""

    def __init__(self) -> None:
        super().__init__(printable_script())

    async def update_weights(self, path: str, version: int) -> None:
        Path(path).read_bytes()
        await super().update_weights(path, version)


def test_a_replica_that_cannot_load_the_fleets_weights_is_not_ready(make_service) -> None:
    service = make_service(engine_factory=factory_of(FileLoad), fleet_poll_s=0.05)
    fleet = service.app.state.weights_store.fleet
    service.redis.hset(fleet.record_key, mapping={"version": 3, "path": "gone.safetensors", "digest": "x"})
    with service.client() as http:
        _wait_for(lambda: http.get("/readyz").status_code == 503, "readiness to drop")
        ready = http.get("/readyz").json()
        _checkpoint(service, "gone.safetensors", 0.5)  # the shared volume catches up
        _wait_for(lambda: http.get("/readyz").status_code == 200, "readiness to return")
        assert http.get("/weights").json()["policy_version"] == 3
    assert "cannot serve the fleet's policy_version 3" in ready["fleet"] and ready["policy_version"] == 0
