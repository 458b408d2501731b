"""deploy/prometheus/ (compose and Kubernetes configs) and the alert rules: promtool checks and unit tests, exported metric names."""

from __future__ import annotations

import yaml
from deploy_tools import METRIC_NAME, PROMETHEUS, ROOT, exported_metric_names, run, tool

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


def test_alerts_cover_the_agreed_failures_with_exported_metrics() -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"TreePOQueueBackingUp", "TreePONoTreesCompleted", "TreePOHighErrorRate"} <= names
    assert "TreePOWeightUpdateFailed" in names
    exported = exported_metric_names()
    for rule in rules:
        unknown = set(METRIC_NAME.findall(rule["expr"])) - exported
        assert not unknown, f"alert {rule['alert']} uses metrics nobody exports: {unknown}"
        assert rule["annotations"]["summary"] and rule["labels"]["severity"] in ("warning", "critical")
