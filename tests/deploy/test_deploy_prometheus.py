"""deploy/prometheus.yml and the alert rules: promtool checks and unit tests, exported metric names."""

from __future__ import annotations

import yaml
from deploy_tools import DEPLOY, METRIC_NAME, exported_metric_names, run, tool

PROMTOOL_HINT = "Debian package prometheus: apt-get install -y prometheus"


def test_prometheus_config_is_valid() -> None:
    run(tool("promtool", PROMTOOL_HINT), "check", "config", str(DEPLOY / "prometheus.yml"))


def test_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    promtool = tool("promtool", PROMTOOL_HINT)
    run(promtool, "check", "rules", str(DEPLOY / "alerts.yml"))
    run(promtool, "test", "rules", str(DEPLOY / "alerts.test.yml"))


def test_scrape_targets_match_the_compose_services() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for group in job["static_configs"] for t in group["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets["treepo-service"] == ["service:8000", "service-gpu:8000"]
    assert targets["treepo-trainer"] == ["trainer:9100"]
    assert config["rule_files"] == ["alerts.yml"]


def test_alerts_cover_the_agreed_failures_with_exported_metrics() -> None:
    rules = [r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"TreePOQueueBackingUp", "TreePONoTreesCompleted", "TreePOHighErrorRate"} <= names
    assert "TreePOWeightUpdateFailed" in names
    exported = exported_metric_names()
    for rule in rules:
        unknown = set(METRIC_NAME.findall(rule["expr"])) - exported
        assert not unknown, f"alert {rule['alert']} uses metrics nobody exports: {unknown}"
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in ("warning", "critical")
