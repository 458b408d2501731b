"""A real Prometheus scrapes the real metric registries of the service and the trainer, then answers every
dashboard query and every alert expression without an error."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from deploy_tools import PROMETHEUS, as_promql, dashboard_exprs, tool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 400 carries Prometheus' own error message
        return json.load(exc)


@pytest.fixture
def exporters():
    """The service's and the trainer's registries on two real /metrics endpoints, with some traffic."""
    from prometheus_client import start_http_server

    from treepo.service.metrics import ServiceMetrics
    from treepo.trainer.metrics import TrainerMetrics

    service, trainer = ServiceMetrics(), TrainerMetrics()
    service.decoded_tokens.inc(1200)
    service.independent_tokens.inc(3000)
    service.engine_batch_size.observe(16)
    trainer.step_duration.observe(2.0)
    ports = [free_port(), free_port()]
    servers = [
        start_http_server(port, "127.0.0.1", registry=m.registry)
        for port, m in zip(ports, (service, trainer), strict=True)
    ]
    yield ports
    for server, thread in servers:
        server.shutdown()
        thread.join(timeout=5)


@pytest.fixture
def prometheus(tmp_path, exporters):
    binary = tool("prometheus", "Debian package prometheus: apt-get install -y prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "treepo-service", "static_configs": [{"targets": [f"127.0.0.1:{exporters[0]}"]}]},
            {"job_name": "treepo-trainer", "static_configs": [{"targets": [f"127.0.0.1:{exporters[1]}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                up = query(base, "sum(up)")["data"]["result"]
            except OSError:
                up = []
            if up and float(up[0]["value"][1]) == 2:
                break
            time.sleep(0.3)
        else:
            pytest.fail("Prometheus did not scrape both exporters within 30 s")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_every_dashboard_and_alert_query_runs(prometheus) -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    exprs = [(f"{name}: {title}", as_promql(expr)) for name, title, expr in dashboard_exprs()]
    exprs += [(f"alert {rule['alert']}", rule["expr"]) for rule in rules]
    for where, expr in exprs:
        answer = query(prometheus, expr)
        assert answer["status"] == "success", f"{where}: {answer.get('error')}"
    saved = query(prometheus, "1 - max(treepo_decoded_tokens_total) / max(treepo_independent_tokens_total)")
    assert float(saved["data"]["result"][0]["value"][1]) == pytest.approx(0.6)
