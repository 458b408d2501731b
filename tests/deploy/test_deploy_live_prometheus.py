"""A real Prometheus scrapes what the fleet's Prometheus scrapes: the service's and the trainer's real registries
(with the `engine` label the scrape configs add), a real SGLang /metrics (recorded from SGLang 0.5.23) and a real
Redis exporter in front of a private redis-server. It loads the real rule file, then answers every dashboard query,
recording rule and alert expression without an error, and knows every sglang:* and redis_* name they use."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from deploy_tools import (
    PENDING_METRICS,
    PROMETHEUS,
    REDIS_NAME,
    SGLANG_METRICS,
    SGLANG_NAME,
    as_promql,
    dashboard_exprs,
    tool,
)

PROMETHEUS_HINT = "Debian package prometheus: apt-get install -y prometheus"
EXPORTER_HINT = "Debian package prometheus-redis-exporter: apt-get install -y prometheus-redis-exporter"
JOBS = ("treepo-service", "treepo-trainer", "sglang", "redis")


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


def wait_for(check, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout_s:.0f} s")


class SGLangMetrics(http.server.BaseHTTPRequestHandler):
    """Serves the recorded /metrics of the real SGLang server."""

    def do_GET(self) -> None:
        body = SGLANG_METRICS.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def redis_exporter(tmp_path_factory):
    """A private redis-server with a memory budget and the real redis_exporter in front of it."""
    redis_server = tool("redis-server", "Debian package redis-server")
    exporter = tool("prometheus-redis-exporter", EXPORTER_HINT)
    redis_port, exporter_port = free_port(), free_port()
    redis = subprocess.Popen(
        [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", "64mb", "--maxmemory-policy", "noeviction", "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    process = subprocess.Popen(
        [exporter, "-redis.addr", f"redis://127.0.0.1:{redis_port}", "-web.listen-address",
         f"127.0.0.1:{exporter_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield exporter_port
    finally:
        for proc in (process, redis):
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def exporters(redis_exporter):
    """job -> port: the real service and trainer registries with some traffic, the recorded SGLang /metrics and
    the Redis exporter."""
    from prometheus_client import start_http_server

    from treepo.service.metrics import ServiceMetrics
    from treepo.trainer.metrics import TrainerMetrics

    service, trainer = ServiceMetrics(), TrainerMetrics()
    service.decoded_tokens.inc(1200)
    service.independent_tokens.inc(3000)
    service.sampling_duration.observe(2.0)
    service.policy_version.set(3)
    trainer.step_duration.observe(2.0)
    ports = {"treepo-service": free_port(), "treepo-trainer": free_port(), "redis": redis_exporter}
    servers = [
        start_http_server(ports[job], "127.0.0.1", registry=m.registry)
        for job, m in (("treepo-service", service), ("treepo-trainer", trainer))
    ]
    sglang = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SGLangMetrics)
    ports["sglang"] = sglang.server_address[1]
    thread = threading.Thread(target=sglang.serve_forever, daemon=True)
    thread.start()
    yield ports
    sglang.shutdown()
    thread.join(timeout=5)
    for server, server_thread in servers:
        server.shutdown()
        server_thread.join(timeout=5)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, exporters):
    binary = tool("prometheus", PROMETHEUS_HINT)
    tmp_path = tmp_path_factory.mktemp("prometheus")
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{exporters[job]}"],
                        "labels": {"engine": "embedded"} if "treepo" in job else {},
                    }
                ],
            }
            for job in JOBS
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
        up = lambda: query(base, "sum(up)")["data"]["result"]  # noqa: E731
        wait_for(
            lambda: up() and float(up()[0]["value"][1]) == len(JOBS), "Prometheus scraped every exporter"
        )
        recorded = lambda: query(base, "treepo:tokens_saved:ratio_rate15m")["data"]["result"]  # noqa: E731
        wait_for(recorded, "the recording rules were evaluated")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def test_every_dashboard_query_and_rule_runs(prometheus) -> None:
    exprs = [(f"{name}: {title}", as_promql(expr)) for name, title, expr in dashboard_exprs()]
    exprs += [(f"rule {rule.get('alert') or rule['record']}", rule["expr"]) for rule in rules()]
    for where, expr in exprs:
        answer = query(prometheus, expr)
        assert answer["status"] == "success", f"{where}: {answer.get('error')}"
    saved = '1 - max(treepo_decoded_tokens_total{engine="embedded"}) / max(treepo_independent_tokens_total)'
    assert float(query(prometheus, saved)["data"]["result"][0]["value"][1]) == pytest.approx(0.6)
    replicas = query(
        prometheus, as_promql('count(up{job="treepo-service", engine="$engine"} == 1) or vector(0)')
    )
    assert float(replicas["data"]["result"][0]["value"][1]) == 1


def test_every_sglang_and_redis_name_exists_in_a_real_exporter(prometheus) -> None:
    with urllib.request.urlopen(f"{prometheus}/api/v1/label/__name__/values", timeout=5) as response:
        scraped = set(json.load(response)["data"])
    texts = [expr for _, _, expr in dashboard_exprs()] + [rule["expr"] for rule in rules()]
    used = {name for text in texts for name in SGLANG_NAME.findall(text) + REDIS_NAME.findall(text)}
    assert {"redis_memory_used_bytes", "redis_memory_max_bytes", "sglang:cache_hit_rate"} <= used
    assert not used - scraped - set(PENDING_METRICS), f"no real exporter has {sorted(used - scraped)}"
    budget = query(prometheus, "max(redis_memory_max_bytes)")["data"]["result"]
    assert float(budget[0]["value"][1]) == 64 * 2**20
