"""`treepo bench load` runs end to end against a real `treepo serve` (short levels) and reports every figure."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from treepo.service.cli import app


@pytest.mark.slow
def test_bench_load_reports_throughput_latency_rejections_and_memory(redis_url: str) -> None:
    args = ["bench", "load", "--duration-s", "1", "--clients", "1", "--clients", "4", "--json"]
    args += ["--delivery", "queue", "--max-queue-depth", "3", "--redis-url", redis_url]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [level["clients"] for level in report["levels"]] == [1, 4]
    first, second = report["levels"]
    assert first["requests"] >= 1 and first["trees_per_s"] > 0 and first["errors"] == 0
    assert second["rejected_429"] > 0  # nobody consumes: the queue fills up and backpressure answers 429
    assert 0 < first["p50_s"] <= first["p95_s"]
    assert report["rss_start_mb"] > 0 and second["rss_after_mb"] > 0
