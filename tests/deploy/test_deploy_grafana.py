"""Grafana dashboards: the structure Grafana's schema requires, PromQL that parses, known metrics."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploy_tools import (
    DASHBOARDS,
    DEPLOY,
    METRIC_NAME,
    SGLANG_NAME,
    as_promql,
    dashboard_exprs,
    exported_metric_names,
    run,
    sglang_fixture_names,
    tool,
)

PANEL_TYPES = {"stat", "timeseries", "gauge", "bargauge", "table", "text", "row", "heatmap"}
DATASOURCE_UID = yaml.safe_load(
    (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
)["datasources"][0]["uid"]


def boxes_overlap(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path) -> None:
    board = json.loads(path.read_text())
    assert isinstance(board["uid"], str) and 0 < len(board["uid"]) <= 40
    assert board["title"] and isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board.get("id") is None, "provisioned dashboards must not carry a database id"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in board["panels"]:
        where = f"{path.name}: panel {panel['title']!r}"
        assert panel["type"] in PANEL_TYPES, where
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "hwxy") and grid["x"] + grid["w"] <= 24, where
        if panel["type"] == "row":  # a heading: no query
            assert grid["w"] == 24 and grid["h"] == 1 and not panel.get("targets"), where
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, where
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID and target["expr"].strip(), where
    for i, a in enumerate(board["panels"]):
        for b in board["panels"][i + 1 :]:
            assert not boxes_overlap(a["gridPos"], b["gridPos"]), f"{a['title']!r} overlaps {b['title']!r}"


def test_dashboard_uids_are_unique_and_provisioned() -> None:
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert sorted(uids) == ["treepo-sampling", "treepo-trainer"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "treepo.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_expr_uses_only_exported_metrics() -> None:
    exported = exported_metric_names()
    used = set()
    for name, title, expr in dashboard_exprs():
        unknown = set(METRIC_NAME.findall(expr)) - exported
        assert not unknown, f"{name}: panel {title!r} queries metrics nobody exports: {unknown}"
        used |= set(METRIC_NAME.findall(expr))
    missing = {n for n in exported if not n.endswith(("_sum", "_count", "_bucket"))} - used
    histograms = {n.removesuffix("_bucket") for n in exported if n.endswith("_bucket")}
    missing |= {h for h in histograms if f"{h}_bucket" not in used and f"{h}_sum" not in used}
    assert not missing, f"exported series no dashboard shows: {sorted(missing)}"


def test_every_expr_parses_with_promtool(tmp_path) -> None:
    promtool = tool("promtool", "Debian package prometheus: apt-get install -y prometheus")
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": as_promql(expr)}
        for i, (_, _, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def board(uid: str) -> dict:
    return next(
        json.loads(path.read_text()) for path in DASHBOARDS if json.loads(path.read_text())["uid"] == uid
    )


@pytest.mark.parametrize("uid", ["treepo-sampling", "treepo-trainer"])
def test_one_engine_at_a_time(uid: str) -> None:
    """The engine variable takes one value, and every query of our series selects it: the CPU (embedded) and the
    GPU (sglang) services are never summed together."""
    variables = {v["name"]: v for v in board(uid)["templating"]["list"]}
    engine = variables["engine"]
    assert engine["type"] == "query" and not engine["multi"] and not engine["includeAll"]
    assert "engine" in engine["query"]["query"]
    for panel in board(uid)["panels"]:
        for target in panel.get("targets", []):
            for selector in re.findall(
                r"\b(?:treepo_[a-z0-9_]+|up)\{[^}]*\}|\btreepo_[a-z0-9_]+\b(?!\{)", target["expr"]
            ):
                if selector.startswith("up{") and 'job="treepo-service"' not in selector:
                    continue  # workers, trainer and Redis targets are listed, not summed with the services
                assert 'engine="$engine"' in selector, (
                    f"{uid}: panel {panel['title']!r} does not filter {selector}"
                )


def test_fleet_row_and_sglang_metrics_next_to_ours() -> None:
    panels = board("treepo-sampling")["panels"]
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows[0].startswith("Fleet") and any("SGLang" in title for title in rows)
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    assert (
        'up{job="treepo-service"' in exprs
        and 'up{job="sglang"}' in exprs
        and "treepo_policy_version" in exprs
    )
    recorded = sglang_fixture_names()
    used = set(SGLANG_NAME.findall(exprs))
    assert {"sglang:cached_tokens_total", "sglang:prompt_tokens_total", "sglang:num_running_reqs"} <= used
    assert used <= recorded, (
        f"sglang names the real server (0.5.23) does not export: {sorted(used - recorded)}"
    )
