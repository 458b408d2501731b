"""Bring-up of what the demo and the benchmarks need on a fresh machine: Redis and the rollout service.

The service runs as a subprocess (`treepo serve`), not in a thread of the trainer: it then has its own
interpreter and GIL, so on a 2-core machine tree sampling and the training step really run at the same
time (one core each), and the setup is the one a deployment has (two processes talking HTTP and Redis).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

logger = logging.getLogger(__name__)

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
# `treepo serve`, run as `python -c` so it works from any venv without the console script on PATH.
_SERVE = "import typer; from treepo.service.serve import serve; typer.run(serve)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


@dataclass(slots=True)
class RedisHandle:
    url: str
    origin: str  # "REDIS_URL", "local" or "private"
    process: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def ensure_redis(workdir: Path) -> RedisHandle:
    """REDIS_URL if set, else the local Redis if it answers, else a private `redis-server` on a free port."""
    if url := os.environ.get("REDIS_URL"):
        if not redis_answers(url):
            raise RuntimeError(f"REDIS_URL={url} does not answer PING; start it or unset REDIS_URL")
        return RedisHandle(url, "REDIS_URL")
    if redis_answers(LOCAL_REDIS):
        return RedisHandle(LOCAL_REDIS, "local")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no Redis: set REDIS_URL, start one on 127.0.0.1:6379, or install redis-server")
    port = free_port()
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--dir",
        str(workdir),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    _wait(lambda: redis_answers(url), 10, f"redis-server on port {port}")
    return RedisHandle(url, "private", process)


@dataclass(slots=True)
class ServiceProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_service(
    *,
    redis_url: str,
    key_prefix: str,
    weights_dir: Path,
    log_path: Path,
    model_path: str | None = None,
    threads: int = 1,
    timeout_s: float = 180.0,
    extra_env: dict[str, str] | None = None,
) -> ServiceProcess:
    """`treepo serve` (embedded engine) on a free port; returns once /readyz answers 200."""
    port = free_port()
    options = {
        "--port": str(port),
        "--engine": "embedded",
        "--weights-dir": str(weights_dir),
        "--redis-url": redis_url,
        "--log-level": "warning",
        "--model": model_path,
    }
    args = [sys.executable, "-c", _SERVE, *(x for k, v in options.items() if v for x in (k, v))]
    env = {
        **os.environ,
        "TREEPO_KEY_PREFIX": key_prefix,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        **(extra_env or {}),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    service = ServiceProcess(f"http://127.0.0.1:{port}", process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with code {process.returncode}; see {log_path}")
        try:
            return httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(ready, timeout_s, f"the service on port {port}")
    except BaseException:
        service.stop()
        raise
    return service


def _wait(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout_s:.0f}s")
        time.sleep(0.1)
