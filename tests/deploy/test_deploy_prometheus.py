"""deploy/prometheus/ (compose and Kubernetes configs) and the alert rules: promtool checks and unit tests, exported metric names."""

from __future__ import annotations

import re

import yaml
from deploy_tools import METRIC_NAME, PENDING_METRICS, PROMETHEUS, ROOT, exported_metric_names, run, tool

PROMTOOL_HINT = "Debian package prometheus: apt-get install -y prometheus"


def test_prometheus_config_is_valid() -> None:
    run(tool("promtool", PROMTOOL_HINT), "check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    promtool = tool("promtool", PROMTOOL_HINT)
    run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    run(promtool, "test", "rules", str(PROMETHEUS / "alerts.test.yml"))


def test_scrape_targets_match_the_compose_services() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    targets = {
        job["job_name"]: {
            t: group.get("labels", {}) for group in job["static_configs"] for t in group["targets"]
        }
        for job in config["scrape_configs"]
    }
    assert set(targets) == {"treepo-service", "treepo-trainer", "sglang", "redis"}
    for job, hosts in targets.items():
        for target in hosts:
            assert target.split(":")[0] in compose, f"{job} scrapes {target}, not a compose service"
    # every replica of our services carries its engine, so dashboards and alerts never sum CPU and GPU together
    assert {t: labels["engine"] for t, labels in targets["treepo-service"].items()} == {
        "service:8000": "embedded",
        "service-gpu:8000": "sglang",
    }
    assert {labels["engine"] for labels in targets["treepo-trainer"].values()} == {"embedded", "sglang"}
    assert config["rule_files"] == ["alerts.yml"]


ISSUE_ALERTS = {  # issue 13: what the fleet must alert on
    "TreePOSGLangWorkerDown",
    "TreePOSGLangWorkerBehindFleet",
    "TreePOTokensSavedLow",
    "TreePOCacheHitRateDrop",
    "TreePOTreeRateDrop",
    "TreePOQueueBackingUp",
    "TreePOStalenessHigh",
    "TreePOWeightUpdateSlow",
    "TreePOWeightPushSlow",
    "TreePOWeightUpdateFailed",
    "TreePORedisMemoryHigh",
}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_alerts_cover_the_agreed_failures_with_exported_metrics() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert ISSUE_ALERTS | {"TreePONoTreesCompleted", "TreePOHighErrorRate", "TreePOServiceDown"} <= names
    known = exported_metric_names() | set(PENDING_METRICS)
    for rule in rules:
        unknown = set(METRIC_NAME.findall(rule["expr"])) - known
        assert not unknown, f"alert {rule['alert']} uses metrics nobody exports: {unknown}"
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in ("warning", "critical")


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    cases = [
        case
        for test in yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"no unit test fires {rule['alert']}"
        assert any(not case["exp_alerts"] for case in mine), f"no unit test keeps {rule['alert']} quiet"


def test_service_alerts_never_sum_engines_together() -> None:
    for rule in alert_rules():
        for aggregation in re.findall(r"\b(sum|max|min|count)\b( by \(([^)]*)\))?", rule["expr"]):
            op, _, by = aggregation
            uses_service_series = any(
                n.startswith("treepo_") and not n.startswith("treepo_trainer_") and n not in QUEUE_WIDE
                for n in METRIC_NAME.findall(rule["expr"])
            )
            if uses_service_series:
                assert "engine" in by, (
                    f"{rule['alert']}: {op} without `by (engine)` mixes CPU and GPU services"
                )


QUEUE_WIDE = {"treepo_queue_depth_trees", "treepo_queue_oldest_age_seconds"}  # one Redis stream for the fleet
