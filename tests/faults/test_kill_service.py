"""Fault scenario 1 with real processes: `kill -9` of `treepo serve` with queue trees accepted and unsampled,
restart, and every accepted tree id ends up exactly once in the trees or the failures stream; the
Idempotency-Key of an inline request killed with it is free again after its lease."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from treepo.client import RetryPolicy, TreePOClient
from treepo.client import constants as names

PREFIX = "fault-kill"
TREE = {"width": 4, "branch": 2, "segment_tokens": 6, "max_depth": 3}
LEASE_S = 1.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class ServiceProcess:
    """`treepo serve --engine scripted` as a subprocess (slow engine calls: trees stay unsampled a while)."""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / f"serve-{self.port}.log").open("wb")
        env = {
            **os.environ,
            "TREEPO_REDIS_URL": redis_url,
            "TREEPO_KEY_PREFIX": PREFIX,
            "TREEPO_SCRIPTED_LATENCY_S": "0.4",
            "TREEPO_JOB_LEASE_S": str(LEASE_S),
            "TREEPO_IDEMPOTENCY_LEASE_S": "2",
            "TREEPO_RETRY_AFTER_S": "1",
            "TREEPO_WEIGHTS_DIR": str(workdir / "weights"),
        }
        env.pop("TREEPO_API_TOKEN", None)
        command = [str(Path(sys.executable).with_name("treepo")), "serve", "--engine", "scripted"]
        command += ["--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"treepo serve exited: see {self.log.name}"
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, "treepo serve to be ready", timeout_s=30)

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


INLINE_KEY = "inline-owner-killed"
INLINE_REQUEST = {"prompts": ["9+9="], "tree": TREE, "sampling": {"seed": 4}}


def _inline_until_killed(url: str) -> None:
    # the service is killed under it
    with TreePOClient(url, retry=RetryPolicy(max_attempts=1)) as treepo, contextlib.suppress(httpx.HTTPError):
        treepo.rollout_tree(**INLINE_REQUEST, idempotency_key=INLINE_KEY)


def _published(client: redis.Redis) -> list[str]:
    """Tree ids in the trees stream and in the failures stream (duplicates kept)."""
    trees = client.xrange(names.trees_stream(PREFIX))
    failures = client.xrange(names.failures_stream(PREFIX))
    ids = [json.loads(fields[names.TREE_FIELD])["tree_id"] for _, fields in trees]
    return ids + [json.loads(fields[names.FAILURE_FIELD])["tree_id"] for _, fields in failures]


def _queue(http: httpx.Client, num_prompts: int, seed: int, key: str | None = None) -> httpx.Response:
    body = {
        "prompts": [{"text": f"{seed}+{i}="} for i in range(num_prompts)],
        "tree": TREE,
        "sampling": {"seed": seed},
        "delivery": "queue",
    }
    headers = {"Idempotency-Key": key} if key else {}
    answer = http.post("/rollout_tree", json=body, headers=headers)
    assert answer.status_code == 202, answer.text
    return answer


def test_kill_9_of_the_service_loses_no_accepted_tree(private_redis, tmp_path: Path) -> None:
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)
    first = ServiceProcess(private_redis.url, tmp_path)
    second = None
    try:
        first.wait_ready()
        accepted: list[str] = []
        with httpx.Client(base_url=first.url, timeout=30) as http:
            accepted += _queue(http, 2, seed=1).json()["tree_ids"]
            _wait(lambda: len(_published(client)) >= 1, "a first tree", timeout_s=30)
            replayed = _queue(http, 3, seed=2, key="kept-across-the-crash")
            accepted += replayed.json()["tree_ids"]
            for seed in range(3, 6):
                accepted += _queue(http, 3, seed=seed).json()["tree_ids"]
        orphan = threading.Thread(target=_inline_until_killed, args=(first.url,), daemon=True)
        orphan.start()  # an inline request whose Idempotency-Key dies with the process
        orphan_key = names.idempotency_key(INLINE_KEY, PREFIX)
        _wait(lambda: client.exists(orphan_key), "the inline request's key", timeout_s=10)
        first.kill9()
        orphan.join()
        before_restart = _published(client)
        assert len(before_restart) < len(accepted), "the kill came too late: nothing was left unsampled"

        second = ServiceProcess(private_redis.url, tmp_path)
        second.wait_ready()
        leases = f"{PREFIX}:jobs:leases"
        _wait(
            lambda: len(_published(client)) >= len(accepted) and client.zcard(leases) == 0,
            "every accepted tree after the restart",
            timeout_s=40,
        )
        published = _published(client)
        twice = [tree_id for tree_id, count in Counter(published).items() if count > 1]
        assert not twice, f"published twice: {twice}"
        assert sorted(published) == sorted(accepted)
        assert client.hlen(f"{PREFIX}:jobs:reserved") == 0
        with httpx.Client(base_url=second.url, timeout=30) as http:
            again = _queue(http, 3, seed=2, key="kept-across-the-crash")
        assert again.json() == replayed.json() and again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Job-Remaining-Trees"] == "0"
        # the dead owner's key is not stuck: the client retries its 409 until the lease lapses, then runs
        retry = RetryPolicy(max_attempts=8, base_delay_s=0.5, max_delay_s=2.0)
        with TreePOClient(second.url, retry=retry) as treepo:
            answer = treepo.rollout_tree(**INLINE_REQUEST, idempotency_key=INLINE_KEY)
        assert len(answer.trees) == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()
        client.close()


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TREEPO_"):
            monkeypatch.delenv(name)
