"""`treepo bench load`: 1, 8 and 32 concurrent clients for a fixed duration each against a real `treepo serve`
(scripted engine by default: the HTTP, sampler and Redis paths without a model), reporting trees/s, p50/p95
latency, 429s, errors and the server's RSS before and after each level, and once the load is over."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

READY_TIMEOUT_S = 120.0


@dataclass(slots=True)
class Level:
    clients: int
    duration_s: float
    requests: int = 0
    trees: int = 0
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0

    def summary(self) -> dict[str, Any]:
        latencies = sorted(self.latencies_s) or [float("nan")]
        return {
            "clients": self.clients,
            "requests": self.requests,
            "trees_per_s": self.trees / self.duration_s,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "rejected_429": self.statuses["429"],
            "errors": sum(n for status, n in self.statuses.items() if status not in ("200", "202", "429")),
            "statuses": dict(self.statuses),
            "rss_before_mb": self.rss_before_mb,
            "rss_after_mb": self.rss_after_mb,
        }


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`treepo serve` in a subprocess on a free loopback port, with a private Redis key prefix."""

    def __init__(self, engine: str, redis_url: str, env: dict[str, str]) -> None:
        self.port, self.prefix = _free_port(), f"treepo-load-{uuid.uuid4().hex[:8]}"
        self.redis_url = redis_url
        self.workdir = Path(tempfile.mkdtemp(prefix="treepo-load-"))
        treepo = shutil.which("treepo", path=str(Path(sys.executable).parent)) or "treepo"
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "TREEPO_KEY_PREFIX": self.prefix,
            "TREEPO_WEIGHTS_DIR": str(self.workdir / "weights"),
            **env,
        }
        self.env.pop("TREEPO_API_TOKEN", None)
        self.args = [treepo, "serve", "--engine", engine, "--port", str(self.port), "--log-level", "warning"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        import httpx

        log = (self.workdir / "serve.log").open("wb")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"treepo serve did not become ready; see {self.workdir / 'serve.log'}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        import redis

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        client = redis.Redis.from_url(self.redis_url)
        keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def rss_mb(self) -> float:
        assert self.proc is not None
        return rss_mb(self.proc.pid)


async def run_level(url: str, body: dict[str, Any], clients: int, duration_s: float, pid: int) -> Level:
    """`clients` clients, each sending `body` back to back until `duration_s` is over."""
    import httpx

    level = Level(clients, duration_s, rss_before_mb=rss_mb(pid))
    trees_per_request = len(body["prompts"])
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                answer = await http.post("/rollout_tree", json=body)
                status = str(answer.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            level.requests += 1
            level.statuses[status] += 1
            if status in ("200", "202"):
                level.latencies_s.append(time.perf_counter() - started)
                level.trees += trees_per_request
            elif status == "429":
                await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    level.rss_after_mb = rss_mb(pid)
    return level


def bench_load(
    engine: Annotated[
        str, typer.Option(help="scripted | embedded (the shipped tiny model) | sglang.")
    ] = "scripted",
    clients: Annotated[list[int] | None, typer.Option(help="Concurrency levels (repeatable).")] = None,
    duration_s: Annotated[float, typer.Option(min=1, help="Seconds of load per level.")] = 30.0,
    prompts: Annotated[int, typer.Option(min=1, help="Prompts (trees) per request.")] = 1,
    width: Annotated[int, typer.Option(min=1)] = 8,
    segment_tokens: Annotated[int, typer.Option(min=1)] = 16,
    max_depth: Annotated[int, typer.Option(min=1)] = 4,
    delivery: Annotated[
        str, typer.Option(help="inline | queue (nobody consumes: 429s once full).")
    ] = "inline",
    max_queue_depth: Annotated[
        int, typer.Option(min=1, help="Queue depth above which 429 (queue).")
    ] = 10_000,
    scripted_latency_s: Annotated[float, typer.Option(min=0, help="Per-request scripted latency.")] = 0.02,
    redis_url: Annotated[str, typer.Option(help="Redis to use (a private key prefix, deleted after).")] = (
        "redis://127.0.0.1:6379/0"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Concurrent clients against a real `treepo serve`: throughput, latency, 429s, errors, server memory."""
    if delivery not in ("inline", "queue"):
        raise typer.BadParameter(f"unknown delivery {delivery!r}; expected inline or queue")
    levels_wanted = clients or [1, 8, 32]
    body = {
        "prompts": [{"text": f"{10 + i}+{20 + i}="} for i in range(prompts)],
        "tree": {"width": width, "branch": 2, "segment_tokens": segment_tokens, "max_depth": max_depth},
        "delivery": delivery,
    }
    env = {
        "TREEPO_SCRIPTED_LATENCY_S": str(scripted_latency_s),
        "TREEPO_MAX_QUEUE_DEPTH": str(max_queue_depth),
    }
    with ServeProcess(engine, redis_url, env) as server:
        assert server.proc is not None
        rss_start = server.rss_mb
        levels = [
            asyncio.run(run_level(server.url, body, n, duration_s, server.proc.pid)).summary()
            for n in levels_wanted
        ]
        rss_end = server.rss_mb
    result = {
        "engine": engine,
        "delivery": delivery,
        "duration_s": duration_s,
        "request": {k: body[k] for k in ("tree", "delivery")} | {"prompts": prompts},
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_end,
        "levels": levels,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_table(result)


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"treepo bench load ({result['engine']} engine, {result['delivery']}, {result['duration_s']:.0f} s per "
        f"level; server RSS {result['rss_start_mb']:.0f} MB at start, {result['rss_end_mb']:.0f} MB at end)"
    )
    table = Table(title=title)
    for column in (
        "clients",
        "requests",
        "trees/s",
        "p50 s",
        "p95 s",
        "429s",
        "errors",
        "RSS before/after MB",
    ):
        table.add_column(column)
    for row in result["levels"]:
        table.add_row(
            str(row["clients"]),
            str(row["requests"]),
            f"{row['trees_per_s']:.1f}",
            f"{row['p50_s']:.3f}",
            f"{row['p95_s']:.3f}",
            str(row["rejected_429"]),
            str(row["errors"]),
            f"{row['rss_before_mb']:.0f} / {row['rss_after_mb']:.0f}",
        )
    Console().print(table)
