"""Shared fixtures: a real Redis with a unique key prefix per test, free ports."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("TREEPO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SGLANG_SUITE = Path(__file__).parent / "sglang"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/sglang runs real SGLang servers: only when named on the command line (`make test-sglang`)."""
    if collection_path != SGLANG_SUITE:
        return None
    named = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    return not any(path == SGLANG_SUITE or SGLANG_SUITE in path.parents for path in named)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def key_prefix():
    """A unique key prefix; every key under it is deleted after the test."""
    import redis

    prefix = f"treepo-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A `redis-server` of this test alone (AOF on, fsync every second) on a free port, in `directory`."""

    def __init__(self, directory, port: int) -> None:
        self.directory, self.port = directory, port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process = None

    def start(self) -> PrivateRedis:
        import shutil
        import subprocess
        import time

        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        flags = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        flags += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no"]
        self.process = subprocess.Popen([binary, *flags], stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert self.process.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: what has not been fsynced to the AOF is lost, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def private_redis(tmp_path):
    """A started PrivateRedis (killed after the test); `.kill()` and `.start()` again to simulate a crash."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory, port).start()
    yield server
    server.kill()
