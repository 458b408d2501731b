"""Bad input and overload: 422 with field locations, 413, 429 and 503 with Retry-After, failure records."""

from __future__ import annotations

import json
import time

import pytest
from api_helpers import SMALL_TREE, FailingEngine, Service, factory_of

from treepo.client import constants as names

OK_PROMPT = {"text": "1+1="}


def _body(**changes: object) -> dict:
    body: dict = {"prompts": [OK_PROMPT], "tree": dict(SMALL_TREE)}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            body.setdefault(section, {})[field] = value
        else:
            body[section] = value
    return body


CASES = [
    ("width < 1", _body(tree__width=0), ["body", "tree", "width"]),
    ("branch < 1", _body(tree__branch=0), ["body", "tree", "branch"]),
    ("segment_tokens < 1", _body(tree__segment_tokens=0), ["body", "tree", "segment_tokens"]),
    ("segment_tokens > context", _body(tree__segment_tokens=5000), ["body", "tree", "segment_tokens"]),
    ("unknown split policy", _body(tree__split="biggest"), ["body", "tree", "split"]),
    ("text and input_ids", _body(prompts=[{"text": "a", "input_ids": [3]}]), ["body", "prompts", 0]),
    (
        "prompt longer than context",
        _body(prompts=[{"input_ids": [5] * 4096}]),
        ["body", "prompts", 0, "input_ids"],
    ),
    ("empty batch", _body(prompts=[]), ["body", "prompts"]),
    ("ids outside vocabulary", _body(prompts=[{"input_ids": [3, 300]}]), ["body", "prompts", 0, "input_ids"]),
    ("negative ids", _body(prompts=[{"input_ids": [-1]}]), ["body", "prompts", 0]),
    ("unknown field", _body(sampling__temprature=0.5), ["body", "sampling", "temprature"]),
    ("unknown delivery", _body(delivery="email"), ["body", "delivery"]),
    ("top_k = 0", _body(sampling__top_k=0), ["body", "sampling"]),
    ("top_k > vocabulary", _body(sampling__top_k=1000), ["body", "sampling", "top_k"]),
    (
        "stop id outside vocabulary",
        _body(sampling__stop_token_ids=[999]),
        ["body", "sampling", "stop_token_ids"],
    ),
    (
        "max_new_tokens > context",
        _body(sampling__max_new_tokens=10**6),
        ["body", "sampling", "max_new_tokens"],
    ),
    ("bad init_branch range", _body(tree__init_branch=[3, 2]), ["body", "tree"]),
]


@pytest.mark.parametrize(("case", "body", "loc"), CASES, ids=[c[0] for c in CASES])
def test_bad_parameters_get_422_with_the_field(service: Service, case: str, body: dict, loc: list) -> None:
    with service.client() as http:
        answer = http.post("/rollout_tree", json=body)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    assert any(error["loc"] == loc for error in errors), errors
    assert all(error["msg"] for error in errors)


def test_malformed_json_is_422_and_counted(service: Service) -> None:
    with service.client() as http:
        answer = http.post(
            "/rollout_tree", content=b"{not json", headers={"content-type": "application/json"}
        )
        metrics = http.get("/metrics").text
    assert answer.status_code == 422
    assert 'treepo_rejected_requests_total{reason="invalid"} 1.0' in metrics


def test_too_many_bytes_is_413(make_service) -> None:
    service = make_service(max_request_bytes=2048)
    big = _body(prompts=[{"text": "x" * 5000}])
    with service.client() as http:
        declared = http.post("/rollout_tree", json=big)

        def chunks():  # no Content-Length: counted while read
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        chunked = http.post("/rollout_tree", content=chunks(), headers={"content-type": "application/json"})
        metrics = http.get("/metrics").text
    assert declared.status_code == chunked.status_code == 413
    assert "2048 bytes" in declared.json()["detail"]
    assert 'treepo_rejected_requests_total{reason="too_large"} 2.0' in metrics


def test_too_many_prompts_is_413(make_service) -> None:
    service = make_service(max_prompts_per_request=2)
    with service.client() as http:
        answer = http.post("/rollout_tree", json=_body(prompts=[OK_PROMPT] * 3))
    assert answer.status_code == 413 and "limit is 2" in answer.json()["detail"]


def test_full_stream_gets_429_and_is_never_trimmed(make_service) -> None:
    service = make_service(max_queue_depth=2)
    stream = names.trees_stream(service.settings.key_prefix)
    for i in range(2):
        service.redis.xadd(stream, {names.TREE_FIELD: json.dumps({"old": i})})
    with service.client() as http:
        refused = http.post("/rollout_tree", json=_body(delivery="queue"))
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert service.redis.xlen(stream) == 2
        # a trainer consumes and acks both: the backlog is gone, the request is accepted
        service.redis.xgroup_create(stream, "trainer", id="0")
        entries = service.redis.xreadgroup("trainer", "c1", {stream: ">"}, count=10)
        service.redis.xack(stream, "trainer", *[entry_id for entry_id, _ in entries[0][1]])
        accepted = http.post("/rollout_tree", json=_body(delivery="queue"))
        metrics = http.get("/metrics").text
    assert accepted.status_code == 202, accepted.text
    assert 'treepo_rejected_requests_total{reason="queue_full"} 1.0' in metrics


def test_loading_engine_gives_503_with_retry_after(make_service) -> None:
    service = make_service(
        engine_factory=factory_of(lambda: FailingEngine(num_ok=10**9), delay_s=3), wait=False
    )
    with service.client() as http:
        answer = http.post("/rollout_tree", json=_body())
        ready = http.get("/readyz")
        alive = http.get("/healthz")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert "loading" in answer.json()["detail"]
    assert ready.status_code == 503 and ready.json()["engine"] == "loading"
    assert alive.status_code == 200


def test_engine_that_fails_to_load_is_reported(make_service) -> None:
    def broken(settings):
        raise OSError("no model at /nowhere")

    service = make_service(engine_factory=broken, wait=False)
    time.sleep(0.3)
    with service.client() as http:
        ready = http.get("/readyz").json()
        answer = http.post("/rollout_tree", json=_body())
    assert ready["engine"] == "failed" and "no model at /nowhere" in ready["engine_error"]
    assert answer.status_code == 503 and "failed to load" in answer.json()["detail"]


def test_accepted_trees_of_a_failing_engine_become_failure_records(make_service) -> None:
    service = make_service(engine_factory=factory_of(lambda: FailingEngine(num_ok=1)))
    body = _body(delivery="queue", prompts=[OK_PROMPT, {"text": "2+2="}])
    with service.client() as http:
        accepted = http.post("/rollout_tree", json=body).json()
    failures = names.failures_stream(service.settings.key_prefix)
    deadline = time.monotonic() + 10
    while service.redis.xlen(failures) < 2:
        assert time.monotonic() < deadline, "failure records missing"
        time.sleep(0.05)
    records = [json.loads(f[names.FAILURE_FIELD]) for _, f in service.redis.xrange(failures)]
    assert sorted(r["tree_id"] for r in records) == sorted(accepted["tree_ids"])
    assert all(
        r["request_id"] == accepted["request_id"] and "backend exploded" in r["error"] for r in records
    )
    assert service.redis.xlen(names.trees_stream(service.settings.key_prefix)) == 0


def test_inline_with_a_failing_engine_is_a_bad_gateway_with_details(make_service) -> None:
    service = make_service(engine_factory=factory_of(lambda: FailingEngine(num_ok=0)))
    with service.client() as http:
        answer = http.post("/rollout_tree", json=_body())
        metrics = http.get("/metrics").text
    assert answer.status_code == 502
    assert "backend exploded" in answer.json()["detail"]["failures"][0]["error"]
    assert 'treepo_engine_errors_total{reason="error"}' in metrics
    assert 'treepo_engine_errors_total{reason="error"} 0.0' not in metrics
