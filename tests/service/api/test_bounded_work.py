"""Bounded work: a per-request token budget, inline work cancelled when its client leaves, probes answered
while the engine is saturated or hung."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest
from api_helpers import SMALL_TREE, Service, factory_of

from treepo.service.engine.scripted import ScriptedEngine
from treepo.service.factory import printable_script

DEEP = {"width": 1, "branch": 1, "segment_tokens": 1, "max_depth": 400}  # 400 engine calls one after another


class CountingEngine(ScriptedEngine):
    """Scripted engine that counts generate() calls; with `hold`, every call waits until it is set."""

    def __init__(self, latency_s: float = 0.0, hold: threading.Event | None = None) -> None:
        super().__init__(printable_script(eos_probability=0.0), latency_s=latency_s)
        self.count = 0
        self.hold = hold

    async def generate(self, request: Any) -> Any:
        self.count += 1
        while self.hold is not None and not self.hold.is_set():
            await asyncio.sleep(0.01)
        return await super().generate(request)


class HungHealthEngine(ScriptedEngine):
    async def health(self) -> bool:
        await asyncio.Event().wait()  # never answers
        return True


class WorkersEngine(ScriptedEngine):
    """An engine over workers (as SGLang's): healthy while one serves, `unhealthy_workers` the others."""

    def __init__(self, down: list[str], healthy: bool) -> None:
        super().__init__()
        self.unhealthy_workers, self._healthy = down, healthy

    async def health(self) -> bool:
        return self._healthy


@pytest.mark.parametrize(
    ("down", "healthy", "status", "engine"),
    [
        ([], True, 200, "ready"),
        (["http://w1"], True, 200, "degraded"),
        (["http://w0", "http://w1"], False, 503, "unhealthy"),
    ],
)
def test_readyz_stays_ready_while_some_workers_are_down(make_service, down, healthy, status, engine) -> None:
    service = make_service(engine_factory=factory_of(lambda: WorkersEngine(down, healthy)), wait=False)
    with service.client() as http:
        while (ready := http.get("/readyz")).json()["engine"] == "loading":
            time.sleep(0.05)
        if status == 200:  # the service still answers trees meanwhile
            body = {"prompts": [{"text": "2"}], "tree": SMALL_TREE}
            assert http.post("/rollout_tree", json=body).status_code == 200
    assert ready.status_code == status and ready.json()["engine"] == engine
    assert ready.json()["workers_down"] == down


def _gauge(service: Service, name: str) -> float:
    with service.client() as http:
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _raw_post(service: Service, body: dict) -> socket.socket:
    """An HTTP request sent on a bare socket (closed by the caller to play a client that gives up)."""
    payload = json.dumps(body).encode()
    host, port = service.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST /rollout_tree HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("delivery", ["inline", "queue", "stream"])
def test_a_request_over_the_token_budget_is_413_saying_how_to_fix_it(make_service, delivery: str) -> None:
    service = make_service(max_request_tokens=1000)
    tree = {"width": 4, "branch": 2, "segment_tokens": 6, "max_depth": 3}  # 72 tokens per prompt
    prompts = [{"text": str(i)} for i in range(14)]  # 1,008 tokens
    with service.client() as http:
        over = http.post("/rollout_tree", json={"prompts": prompts, "tree": tree, "delivery": delivery})
        capped = http.post(  # max_new_tokens caps each trajectory: 14 x 4 x 2 = 112
            "/rollout_tree",
            json={"prompts": prompts, "tree": tree, "sampling": {"max_new_tokens": 2}, "delivery": "queue"},
        )
        fits = http.post("/rollout_tree", json={"prompts": prompts[:13], "tree": tree, "delivery": delivery})
    detail = over.json()["detail"]
    assert over.status_code == 413, over.text
    assert (
        "1,008 tokens" in detail and "TREEPO_MAX_REQUEST_TOKENS" in detail and "at most 13 prompts" in detail
    )
    assert capped.status_code == 202 and fits.status_code in (200, 202)


def test_the_default_budget_refuses_a_huge_request_before_any_work(service: Service) -> None:
    body = {"prompts": [{"text": "1"}] * 1024, "tree": {"width": 1024}, "delivery": "queue"}
    with service.client() as http:
        answer = http.post("/rollout_tree", json=body)
    assert answer.status_code == 413 and "split it" in answer.json()["detail"]
    assert service.redis.xlen(f"{service.settings.key_prefix}:trees") == 0


def test_inline_work_stops_when_its_client_disconnects(make_service) -> None:
    engine = CountingEngine(latency_s=0.01)
    service = make_service(engine_factory=factory_of(lambda: engine))
    sock = _raw_post(service, {"prompts": [{"text": "1"}], "tree": DEEP})
    while engine.count < 3:  # the tree is being sampled
        pass
    sock.close()
    deadline = time.monotonic() + 30  # hang guard only
    while _gauge(service, "treepo_inflight_trees") > 0:
        assert time.monotonic() < deadline, "the abandoned tree was never cancelled"
    stopped_at = engine.count
    with service.client() as http:  # the service still serves, and the cancelled tree sends nothing more
        assert http.post("/rollout_tree", json={"prompts": [{"text": "2"}], "tree": DEEP}).status_code == 200
    assert stopped_at < DEEP["max_depth"] and engine.count == stopped_at + DEEP["max_depth"]
    with service.client() as http:
        assert 'status="499"' in http.get("/metrics").text


def test_probes_answer_while_the_engine_is_saturated(make_service) -> None:
    hold = threading.Event()
    engine = CountingEngine(hold=hold)
    service = make_service(engine_factory=factory_of(lambda: engine))
    body = {"prompts": [{"text": str(i)} for i in range(16)], "tree": DEEP}
    sock = _raw_post(service, body)
    try:
        while engine.count < 16:  # every tree waits on the engine
            pass
        with service.client() as http:
            health, ready = http.get("/healthz"), http.get("/readyz")
        assert engine.count == 16 and not hold.is_set()  # answered while no engine call could finish
        assert health.status_code == 200 and ready.status_code == 200 and ready.json()["engine"] == "ready"
    finally:
        hold.set()
        sock.close()


def test_readyz_answers_when_the_engine_health_check_hangs(make_service) -> None:
    service = make_service(engine_factory=factory_of(lambda: HungHealthEngine()), wait=False)
    with service.client() as http:
        while http.get("/healthz").status_code != 200:
            pass
        while (ready := http.get("/readyz")).json()["engine"] == "loading":
            pass
    assert ready.status_code == 503 and ready.json()["engine"] == "unhealthy"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_json_is_a_4xx_not_a_500(service: Service, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    with service.client() as http:
        answer = http.post("/rollout_tree", content=b"garbage=1", headers=headers)
        multipart = http.post("/rollout_tree", files={"prompts": ("p.json", b"[]")})
    assert 400 <= answer.status_code < 500, answer.text
    assert 400 <= multipart.status_code < 500, multipart.text
