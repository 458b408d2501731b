"""Helpers of the deployment checks: deploy files, external linters, exported metric names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# Series an alert needs that no registry exports yet: name -> what the owners are asked to add. An alert on
# one of these stays silent until it exists; dashboards use none of them. Empty: every series is exported.
PENDING_METRICS: dict[str, str] = {}
METRIC_NAME = re.compile(r"\b(treepo_[a-z0-9_]+)\b")
# Grafana's variables as a test substitutes them: one engine, every replica and worker.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$engine": "embedded",
    "$instance": ".*",
    "$worker": ".*",
}
# /metrics of a real SGLang 0.5.23 server (CPU engine, tiny model, --enable-metrics, a few requests served):
# the sglang:* names the dashboards may use.
SGLANG_METRICS = ROOT / "tests" / "deploy" / "fixtures" / "sglang-0.5.23-metrics.txt"
SGLANG_NAME = re.compile(r"(sglang:[a-z0-9_:]+)")
REDIS_NAME = re.compile(r"\b(redis_[a-z0-9_]+)\b")


def tool(name: str, install_hint: str) -> str:
    """Path of an external checker (PATH or this venv's bin), else skip the test saying how to install it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    found = found or shutil.which(name, path=str(ROOT / ".venv-checkov" / "bin"))  # checkov's own environment
    if found is None:
        pytest.skip(f"{name} is not installed ({install_hint})")
    return found


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a checker from the repo root (extra environment in `env`); a failure shows its own output."""
    environ = {**os.environ, **(env or {})}
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=environ)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def exported_metric_names() -> set[str]:
    """Every series name the service and the trainer can expose (counter _total, histogram _bucket...)."""
    from treepo.service.metrics import ServiceMetrics
    from treepo.trainer.metrics import TrainerMetrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for registry in (ServiceMetrics().registry, TrainerMetrics().registry):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def sglang_fixture_names() -> set[str]:
    """Series names in the recorded SGLang /metrics (histograms as _bucket/_sum/_count)."""
    lines = SGLANG_METRICS.read_text().splitlines()
    return {line.split("{")[0].split()[0] for line in lines if line.startswith("sglang:")}


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every target of every dashboard."""
    found = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            found += [(path.name, panel["title"], target["expr"]) for target in panel.get("targets", [])]
    return found


def as_promql(expr: str) -> str:
    """A Grafana expression with its template variables replaced, as Prometheus would receive it."""
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    return expr
