"""Bearer auth, the OpenAPI document, and the Prometheus metrics after a rollout."""

from __future__ import annotations

import re

from api_helpers import SMALL_TREE, Service
from openapi_spec_validator import validate

from treepo.service.metrics import FINISH_REASONS, REJECT_REASONS

METRIC_NAMES = [
    "treepo_http_requests_total",
    "treepo_http_request_duration_seconds",
    "treepo_rollout_prompts_total",
    "treepo_trees_total",
    "treepo_trajectories_total",
    "treepo_decoded_tokens_total",
    "treepo_independent_tokens_total",
    "treepo_prefill_tokens_total",
    "treepo_cached_tokens_total",
    "treepo_engine_calls_total",
    "treepo_engine_requests_in_flight",
    "treepo_finish_reasons_total",
    "treepo_fallbacks_total",
    "treepo_tree_sampling_duration_seconds",
    "treepo_queue_depth_trees",
    "treepo_queue_oldest_age_seconds",
    "treepo_redis_stream_length_entries",
    "treepo_redis_memory_bytes",
    "treepo_redis_trimmed_entries_total",
    "treepo_policy_version",
    "treepo_weight_update_duration_seconds",
    "treepo_weight_update_failures_total",
    "treepo_engine_errors_total",
    "treepo_rejected_requests_total",
    "treepo_inflight_trees",
]


def _value(metrics: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", metrics, re.MULTILINE)
    assert match, f"{sample} not exposed"
    return float(match.group(1))


def test_token_is_required_except_on_probes_and_metrics(make_service) -> None:
    service = make_service(api_token="s3cret")
    body = {"prompts": [{"text": "1"}], "tree": SMALL_TREE}
    with service.client() as anonymous, service.client("wrong") as wrong, service.client("s3cret") as good:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert anonymous.get(path).status_code == 200, path
        for path in ("/weights", "/trees/x", "/openapi.json", "/docs"):
            refused = anonymous.get(path)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", path
        assert anonymous.post("/rollout_tree", json=body).status_code == 401
        assert wrong.post("/rollout_tree", json=body).status_code == 401
        assert good.post("/rollout_tree", json=body).status_code == 200
        assert good.get("/openapi.json").status_code == 200
        metrics = anonymous.get("/metrics").text
    assert _value(metrics, 'treepo_rejected_requests_total{reason="unauthorized"}') == 6
    assert (
        _value(metrics, 'treepo_http_requests_total{method="POST",route="/rollout_tree",status="401"}') == 2
    )


def test_openapi_document_validates(service: Service) -> None:
    with service.client() as http:
        spec = http.get("/openapi.json").json()
        docs = http.get("/docs")
    validate(spec)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = spec["paths"]
    for path in (
        "/rollout_tree",
        "/weights",
        "/trees/{tree_id}",
        "/trees/{tree_id}/view",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    rollout = paths["/rollout_tree"]["post"]
    assert {"200", "202", "413", "422", "429", "503"} <= set(rollout["responses"])
    assert "multipart/form-data" in paths["/weights"]["post"]["requestBody"]["content"]
    assert any(p["name"] == "Idempotency-Key" for p in rollout["parameters"])


def test_metrics_names_labels_and_counts_after_a_rollout(service: Service) -> None:
    with service.client() as http:
        before = http.get("/metrics").text
        for name in METRIC_NAMES:
            assert f"# TYPE {name} " in before, name
        for reason in FINISH_REASONS:
            assert _value(before, f'treepo_finish_reasons_total{{reason="{reason}"}}') == 0
        for reason in REJECT_REASONS:
            assert _value(before, f'treepo_rejected_requests_total{{reason="{reason}"}}') == 0
        body = {"prompts": [{"text": "1"}, {"text": "2"}], "tree": SMALL_TREE}
        trees = http.post("/rollout_tree", json=body).json()["trees"]
        after = http.get("/metrics").text
    assert _value(after, "treepo_trees_total") == 2
    assert _value(after, "treepo_trajectories_total") == 2 * SMALL_TREE["width"]
    decoded = sum(t["stats"]["decoded_tokens"] for t in trees)
    assert _value(after, "treepo_decoded_tokens_total") == decoded
    assert _value(after, "treepo_independent_tokens_total") == sum(
        t["stats"]["independent_tokens"] for t in trees
    )
    assert _value(after, "treepo_engine_calls_total") == len(service.engine.requests)
    assert _value(after, "treepo_engine_requests_in_flight") == 0
    assert _value(after, "treepo_prefill_tokens_total") + _value(after, "treepo_cached_tokens_total") > 0
    leaves = sum(_value(after, f'treepo_finish_reasons_total{{reason="{r}"}}') for r in FINISH_REASONS)
    assert leaves == 2 * SMALL_TREE["width"]
    assert _value(after, 'treepo_rollout_prompts_total{delivery="inline"}') == 2
    assert _value(after, "treepo_tree_sampling_duration_seconds_count") == 2
    assert _value(after, 'treepo_http_requests_total{method="POST",route="/rollout_tree",status="200"}') == 1
    assert _value(after, 'treepo_http_request_duration_seconds_count{route="/rollout_tree"}') == 1
    assert _value(after, "treepo_inflight_trees") == 0
    assert _value(after, "treepo_queue_depth_trees") == 0


def test_queue_gauges_follow_the_stream(service: Service) -> None:
    from treepo.client import constants as names

    stream = names.trees_stream(service.settings.key_prefix)
    service.redis.xadd(stream, {names.TREE_FIELD: "{}"}, id="1-0")  # an entry from 1970: very old
    service.redis.xadd(stream, {names.TREE_FIELD: "{}"})
    with service.client() as http:
        metrics = http.get("/metrics").text
    assert _value(metrics, "treepo_queue_depth_trees") == 2
    assert _value(metrics, "treepo_queue_oldest_age_seconds") > 1e9
